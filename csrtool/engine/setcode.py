"""Set-coded atom indices: a vector's k indices as one sorted multiset, cheaper than k fixed fields.

The order of a vector's atoms carries no information (the decode is a sum), so k indices of b
bits each waste about log2(k!) bits: 9.5 of 78 at k = 6, 79 of 312 at k = 24 (b = 13). Here the
k indices are sorted and split into their top h bits and their low b - h bits:

    the multiset of the k top parts (values < 2^h)   one rank below C(2^h + k - 1, k)   r(k) bits
    the k low parts, in sorted order                   b - h bits each

with h = high_bits(k, b) the split that costs fewest bits while the rank fits an int64. The rank
is the colex rank of the strictly increasing c_j = top_j + j: Σ_j C(c_j, j + 1). A multiset, not
a set, so that matching pursuit's repeated atoms code too. Costs (b = 13): k = 3: 37 bits
(fixed 39, the entropy bound 36.4), 6: 69 (78, 68.5), 12: 128 (156, 127.2), 24: 244 (312, 232.9).

    set_bits(k, b) -> bits of one vector's code          high_bits(k, b) -> h
    cost_table(s_max, b) -> int64 [s_max + 1] set_bits for k = 0..s_max
    sort_codes(idx [R, S], other [R, S], counts [R]) -> both reordered so each row's first counts[r] indices ascend
    encode(idx [R, S] sorted prefixes, counts [R], b) -> (values, widths) int64 [F]: per row its rank, then its low parts
    decode(values/widths source: fields reader, counts [R], b) -> idx [R, S] (zeros past counts), ok

Imports only torch (math for exact binomials); runs on the inputs' device.
"""

from __future__ import annotations

import functools
import math

import torch

from csrtool.engine.adaptive import used_slots

INT64_LIMIT = 1 << 63


@functools.lru_cache(maxsize=None)
def high_bits(k: int, b: int) -> int:
    """Top bits h per index whose multiset rank is coded, 0..b: the cheapest split with C(2^h + k - 1, k) < 2^63."""
    best, best_h = k * b, 0
    for h in range(1, b + 1):
        c = math.comb((1 << h) + k - 1, k)
        if c >= INT64_LIMIT:
            break
        bits = rank_bits(k, h) + k * (b - h)
        if bits < best:
            best, best_h = bits, h
    return best_h


@functools.lru_cache(maxsize=None)
def rank_bits(k: int, h: int) -> int:
    """Bits of the rank of a multiset of k values < 2^h."""
    return (math.comb((1 << h) + k - 1, k) - 1).bit_length()


def set_bits(k: int, b: int) -> int:
    """Bits of one vector's code: k indices of b bits (0 for k = 0)."""
    if k == 0:
        return 0
    h = high_bits(k, b)
    return rank_bits(k, h) + k * (b - h)


def cost_table(s_max: int, b: int, device=None) -> torch.Tensor:
    """int64 [s_max + 1]: set_bits(k, b) for k = 0..s_max."""
    return torch.tensor([set_bits(k, b) for k in range(s_max + 1)], dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=8)
def _binomials(c_max: int, m_max: int) -> torch.Tensor:
    """int64 [c_max + 1, m_max + 1]: C(c, m), saturated at 2^63 - 1 (never reached by a valid rank's terms)."""
    t = torch.zeros(c_max + 1, m_max + 1, dtype=torch.int64)
    for m in range(m_max + 1):
        col = [min(math.comb(c, m), INT64_LIMIT - 1) for c in range(c_max + 1)]
        t[:, m] = torch.tensor(col, dtype=torch.int64)
    return t


def _table(counts: torch.Tensor, b: int, s: int):
    """Per row: h, rank bits, the rank's bound C(2^h + k - 1, k) (int64), and the binomial table that covers them."""
    k_max = max(s, int(counts.max()) if counts.numel() else 0)
    hs = torch.tensor([high_bits(k, b) if k else 0 for k in range(k_max + 1)], dtype=torch.int64)
    rb = torch.tensor([rank_bits(k, int(hs[k])) if k else 0 for k in range(k_max + 1)], dtype=torch.int64)
    bound = torch.tensor([min(math.comb((1 << int(hs[k])) + k - 1, k), INT64_LIMIT - 1) for k in range(k_max + 1)], dtype=torch.int64)
    c_max = max((1 << int(hs[k])) + k - 1 for k in range(k_max + 1))
    return hs, rb, bound, _binomials(c_max, k_max)


def _fields(counts: torch.Tensor, b: int, s: int):
    """The layout of rows with these counts (on the CPU): (counts [R], h [R], used [R, S], keep [R, S + 1]: which
    of [rank, low_0 .. low_{S-1}] each row stores, widths [F] of the stored fields, bound [K + 1], binomials)."""
    counts = counts.reshape(-1).to(torch.int64).cpu()
    hs, rb, bound, binom = _table(counts, b, s)
    h = hs[counts]
    used = used_slots(counts, s)
    keep = torch.cat([counts[:, None] > 0, used], 1)
    widths = torch.cat([rb[counts][:, None], (b - h)[:, None].expand(counts.numel(), s)], 1)[keep]
    return counts, h, used, keep, widths, bound, binom


def sort_codes(idx: torch.Tensor, other: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """idx, other [R, S] with each row's first counts[r] slots used: the used slots in ascending index order
    (other follows its index), unused slots left after them."""
    used = used_slots(counts, idx.shape[1])
    key = torch.where(used, idx.to(torch.int64), torch.iinfo(torch.int64).max)
    order = key.argsort(dim=1, stable=True)
    return idx.gather(1, order), other.gather(1, order)


def encode(idx: torch.Tensor, counts: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fields of rows idx [R, S] (each row's first counts[r] indices ascending, < 2^b): (values, widths) int64 [F],
    row by row its rank and then its counts[r] low parts."""
    s = idx.shape[1]
    counts, h, used, keep, widths, _, binom = _fields(counts, b, s)
    pos = torch.arange(s)[None, :]
    x = torch.where(used, idx.to(torch.int64).cpu(), 0)
    top = x >> (b - h)[:, None]
    low = x & ((1 << (b - h)) - 1)[:, None]
    c = torch.where(used, top + pos, 0)
    rank = torch.where(used, binom[c, (pos + 1).expand_as(c)], 0).sum(1)
    values = torch.cat([rank[:, None], low], 1)[keep]
    return values.to(idx.device), widths.to(idx.device)


def field_widths(counts: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """int64 [F]: the widths encode gives rows with these counts (what a reader needs before the values)."""
    return _fields(counts, b, s)[4]


def decode(values: torch.Tensor, counts: torch.Tensor, b: int, s: int) -> tuple[torch.Tensor, bool]:
    """Inverse of encode: (idx int64 [R, S], zeros past each count; ok). ok is False for a rank at or beyond its
    bound (no valid writer makes one)."""
    counts, h, used, keep, _, bound, binom = _fields(counts, b, s)
    r = counts.numel()
    grid = torch.zeros(r, s + 1, dtype=torch.int64)
    grid[keep] = values.to(torch.int64).cpu()
    rank, low = grid[:, 0].clone(), grid[:, 1:]
    ok = bool((rank[counts > 0] < bound[counts][counts > 0]).all()) if r else True
    if not ok:
        return torch.zeros(r, s, dtype=torch.int64), False
    top = torch.zeros(r, s, dtype=torch.int64)
    for j in range(s - 1, -1, -1):
        active = counts > j
        if not bool(active.any()):
            continue
        col = binom[:, j + 1].contiguous()
        cj = torch.searchsorted(col, rank[active], right=True) - 1  # largest c with C(c, j + 1) <= rank
        rank[active] -= col[cj]
        top[active, j] = cj - j
    idx = torch.where(used, (top << (b - h)[:, None]) | low, 0)
    return idx, True
