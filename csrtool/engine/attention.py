"""Attention on the codes: one decode step (or a few query tokens) over a coded history.

The history of one layer is coded tokens (a key code and a value code per token and
KV head) plus dense verbatim tokens (sink, full-precision window, the new tokens).
The dense history is never rebuilt (docs/attention.md):

- post-RoPE keys: scores = Σ_s coef_s · (q·Dᵀ)[idx_s]  (+ q·mean): one [R, N] product
  per head, then a weighted gather (embedding_bag) over the tokens' indices;
- pre-RoPE keys: a block of keys is decoded, rotated to its positions and dotted
  with q; only one block is ever dense;
- values: the softmax weights times the coefficients are scattered into atom space
  A [R, C, N] (index_add), then one A·D product per head; the mean adds Σw·mean.

Coded tokens go in blocks with an online softmax (running max and sum), merged with
the dense part by log-sum-exp, so memory stays O(block + N) at any length.

    Codes(idx, coef, atoms, scale=None, mean=None)       one side (K or V) of a layer
    Segment(k, v, start)                                 dense tokens at slots start..
    Rope(inv_freq, scaling=1.0)                          re-rotation of pre-RoPE keys
    attend(q, keys, values, dense, ...) -> [B, Hq, Tq, D]
    attend_reference(...)                                 same result, reconstruct-then-attend
    reconstruct(codes) -> [B, H, T, D] float32             decode one side (mean added)

Shapes: B batch, Hq = rep·H query heads, H KV heads, Tq query tokens, T coded
tokens, C channel chunks, S atoms per chunk, N atoms, D = C·Dc head_dim, G = H
(a dictionary per head) or 1 (shared). Slots are cache positions (0 = first token
of the cache), the same for every sequence of the batch; `valid` marks real tokens
(left padding = False). Math is float32 whatever the storage dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from csrtool.engine import rope as _rope

# Coded tokens per block of the online softmax, from the size of its temporaries:
# post-RoPE keys ~40 bytes per (token, head, query row); pre-RoPE keys ~1.5 KB per (token, head)
# for the decoded and rotated keys. Measured on a 2-core CPU (docs/attention.md): fewer,
# larger blocks win for post-RoPE keys (a block costs ~40 torch calls); pre-RoPE keys
# want the rotated block to stay near the caches.
POST_BLOCK_ELEMS = 9 * 32768  # tokens x heads x query rows
PRE_BLOCK_ELEMS = 3 * 4096  # tokens x heads


@dataclass(frozen=True)
class Codes:
    """Sparse codes of T tokens of one layer side (keys or values), as a cache holds them.

    idx   [B, H, T, C, S]  int16 / int32 / int64 (uint8 when N <= 256): atom indices < N.
    coef  [B, H, T, C, S]  float32 / float16 / bfloat16 / float8_e4m3fn / int8.
    atoms [G, C, N, Dc]    float, unit rows; G = H or 1.
    scale None, [B, H] or [B, H, T] float: the coefficient is coef · scale (the .csr's
          per-(batch, head) float32 scale g; for int8 coefficients pass g·v [B, H, T]).
    mean  None or [G, C·Dc]: added to every decoded vector (centred dictionaries).
    """

    idx: torch.Tensor
    coef: torch.Tensor
    atoms: torch.Tensor
    scale: torch.Tensor | None = None
    mean: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.idx.dim() == 5 and self.idx.shape == self.coef.shape, (tuple(self.idx.shape), tuple(self.coef.shape))
        assert self.atoms.dim() == 4 and self.atoms.shape[1] == self.idx.shape[3], (tuple(self.atoms.shape), tuple(self.idx.shape))
        assert self.atoms.shape[0] in (1, self.idx.shape[1]), (tuple(self.atoms.shape), tuple(self.idx.shape))

    @property
    def tokens(self) -> int:
        return self.idx.shape[2]

    def slice(self, t0: int, t1: int) -> "Codes":
        """Tokens t0..t1-1 (views, no copy)."""
        s = self.scale
        if s is not None and s.dim() == 3:
            s = s[:, :, t0:t1]
        return Codes(self.idx[:, :, t0:t1], self.coef[:, :, t0:t1], self.atoms, s, self.mean)


@dataclass(frozen=True)
class Segment:
    """Dense tokens k, v [B, H, T, D] (post-RoPE keys, as a transformers cache holds them) at slots start..start+T-1."""

    k: torch.Tensor
    v: torch.Tensor
    start: int


@dataclass(frozen=True)
class Rope:
    """Keys coded before RoPE are rotated at their positions: inv_freq [D/2], scaling (yarn's attention factor)."""

    inv_freq: torch.Tensor
    scaling: float = 1.0
    _tables: dict = field(default_factory=dict, compare=False, repr=False)

    def table(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """[2, length, D] float32: cos and sin of positions start..start+length-1, as rope.cos_sin gives them.

        Positions >= 0 come from a table kept per device and grown by doubling (512 bytes
        a position at D = 64), so one Rope shared by a model's layers computes each
        position once; negative positions (padding) are computed on the spot."""
        if start < 0:
            return torch.stack(_rope.cos_sin(self.inv_freq, torch.arange(start, start + length, device=device), self.scaling))
        tab = self._tables.get(device)
        if tab is None or tab.shape[1] < start + length:
            size = max(1024, 1 << (start + length - 1).bit_length())
            tab = self._tables[device] = torch.stack(_rope.cos_sin(self.inv_freq, torch.arange(size, device=device), self.scaling))
        return tab[:, start : start + length]


# ---------------------------------------------------------------- shared pieces


def _scale_of(codes: Codes) -> torch.Tensor | None:
    """The coefficient scale broadcastable to [B, H, T]."""
    s = codes.scale
    if s is None:
        return None
    s = s.to(torch.float32)
    return s[:, :, None] if s.dim() == 2 else s


def _mean_of(codes: Codes, device) -> torch.Tensor | None:
    """mean as [1 or H, D] float32."""
    return None if codes.mean is None else codes.mean.to(device, torch.float32)


def reconstruct(codes: Codes) -> torch.Tensor:
    """Decode one side: [B, H, T, C·Dc] float32 = Σ coef·scale·atom (+ mean)."""
    b, h, t, c, s = codes.idx.shape
    g, _, n, dc = codes.atoms.shape
    cf, fac = _coef_f32(codes.coef)
    sc = _scale_of(codes)
    cf = cf * (fac if sc is None else sc[..., None, None] * fac)
    idx = (codes.idx.to(torch.int64) + _offsets(codes, False, torch.int64)).reshape(-1, s)
    out = F.embedding_bag(idx, codes.atoms.to(torch.float32).reshape(g * c * n, dc), per_sample_weights=cf.reshape(-1, s), mode="sum")
    out = out.reshape(b, h, t, c * dc)
    mean = _mean_of(codes, out.device)
    return out if mean is None else out + mean[None, :, None, :]


def _rotate_keys(k: torch.Tensor, pos0: torch.Tensor, t0: int, rp: Rope) -> torch.Tensor:
    """RoPE on k [B, H, T, D] (float32): token t of sequence b at position pos0[b] + t0 + t."""
    b, h, t, d = k.shape
    pos = pos0.to(k.device, torch.float32)[:, None] + torch.arange(t0, t0 + t, device=k.device, dtype=torch.float32)[None, :]
    cos, sin = _rope.cos_sin(rp.inv_freq, pos.reshape(-1), rp.scaling)  # [B*T, D]
    cos, sin = cos.reshape(b, 1, t, d), sin.reshape(b, 1, t, d)
    return k * cos + _rope.rotate_half(k) * sin


def _allowed(slots: Callable[[], torch.Tensor], lo: int, hi: int, valid, q_start: int, tq: int, window: int | None, batch: int) -> torch.Tensor | None:
    """Bool [B, Tq, T] (True = attend) for keys at slots() [T] (all within lo..hi); None when every key is allowed."""
    if valid is None and hi <= q_start and (window is None or lo > q_start + tq - 1 - window):
        return None
    slots = slots()
    qs = torch.arange(q_start, q_start + tq, device=slots.device)[:, None]  # [Tq, 1]
    ok = slots[None, :] <= qs  # [Tq, T]
    if window is not None:
        ok = ok & (slots[None, :] > qs - window)
    ok = ok[None].expand(batch, tq, slots.numel())
    if valid is not None:
        ok = ok & valid.to(slots.device, torch.bool)[:, slots][:, None, :]
    return ok


def _check(q: torch.Tensor, heads: int) -> int:
    b, hq, tq, d = q.shape
    assert hq % heads == 0, (hq, heads)
    return hq // heads


# ---------------------------------------------------------------- reference


def attend_reference(
    q: torch.Tensor,
    keys: Codes | None,
    values: Codes | None,
    dense: Sequence[Segment] = (),
    coded_start: int = 0,
    *,
    rope: Rope | None = None,
    key_pos0: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    q_start: int = 0,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reconstruct-then-attend: decode every coded token to a dense key/value, then plain softmax attention.

    Same arguments and result as `attend`; kept as the reference (O(T·D) memory)."""
    b, hq, tq, d = q.shape
    ks, vs, slots = [], [], []
    if keys is not None and keys.tokens:
        k = reconstruct(keys)
        if rope is not None:
            k = _rotate_keys(k, key_pos0, 0, rope)
        ks.append(k)
        vs.append(reconstruct(values))
        slots.append(torch.arange(coded_start, coded_start + keys.tokens, device=q.device))
    for seg in dense:
        ks.append(seg.k.to(torch.float32))
        vs.append(seg.v.to(torch.float32))
        slots.append(torch.arange(seg.start, seg.start + seg.k.shape[2], device=q.device))
    k_all, v_all, s_all = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(slots)
    rep = _check(q, k_all.shape[1])
    k_all = k_all.repeat_interleave(rep, dim=1)
    v_all = v_all.repeat_interleave(rep, dim=1)
    sc = d**-0.5 if scale is None else scale
    scores = (q.to(torch.float32) @ k_all.transpose(-1, -2)) * sc  # [B, Hq, Tq, T]
    lo, hi = (int(s_all.min()), int(s_all.max())) if s_all.numel() else (0, 0)
    ok = _allowed(lambda: s_all, lo, hi, valid, q_start, tq, window, b)
    if ok is not None:
        scores = scores.masked_fill(~ok[:, None], float("-inf"))
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = p.sum(-1, keepdim=True)
    out = (p @ v_all) / torch.where(l > 0, l, torch.ones_like(l))
    return out.to(q.dtype)


# ---------------------------------------------------------------- on the codes
#
# Layout: the R = rep·Tq query rows of a KV head first, then the B·H heads, then tokens:
# scores [R, BH, T] so that every reduction over tokens runs along contiguous memory.
# Per-(batch, head) coefficient scales and the fp8 factor fold into the small tables
# (q·Dᵀ for post-RoPE keys, q for pre-RoPE keys, the atom mass for values), so the
# per-token work is: widen the indices, widen the coefficients, gather, exp, scatter.


def _coef_f32(c: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Stored coefficients (any view, e.g. permuted) -> (contiguous float32 tensor in c's logical order, factor):
    the coefficient is tensor · factor.

    fp8 e4m3 goes through its bits (torch's own fp8 cast is ~10x slower on CPU): the
    sign-extended byte shifted by 7, with bit 14 cleared, is the float16 of value/256,
    exact for normal and subnormal e4m3 values (a NaN byte, which a valid file never
    holds, would read as ±480)."""
    if c.dtype == torch.float8_e4m3fn:
        b = torch.empty(c.shape, dtype=torch.int16, device=c.device)
        b.copy_(c.view(torch.int8))
        b <<= 7
        b &= -16512  # 0xBF80: sign, then the 7 exponent/mantissa bits
        return b.view(torch.float16).to(torch.float32), 256.0
    out = torch.empty(c.shape, dtype=torch.float32, device=c.device)
    return out.copy_(c), 1.0


def _offsets(codes: Codes, per_batch: bool, dtype: torch.dtype) -> torch.Tensor:
    """Row offsets into a flat table, [B or 1, H, 1, C, 1]: ((b·H + h)·C + c)·N (per_batch) or (g·C + c)·N."""
    b, h, _, c, _ = codes.idx.shape
    n = codes.atoms.shape[2]
    dev = codes.idx.device
    if per_batch:
        return (torch.arange(b * h * c, device=dev, dtype=dtype) * n).reshape(b, h, 1, c, 1)
    g = codes.atoms.shape[0]
    heads = torch.arange(h, device=dev, dtype=dtype) if g > 1 else torch.zeros(h, device=dev, dtype=dtype)
    return ((heads[:, None] * c + torch.arange(c, device=dev, dtype=dtype)[None, :]) * n).reshape(1, h, 1, c, 1)


def _head_factor(codes: Codes, fac: float, bh: int, device) -> torch.Tensor | None:
    """The per-(batch, head) part of the coefficient scale times `fac`, [BH] (None if it is 1)."""
    if codes.scale is not None and codes.scale.dim() == 2:
        return codes.scale.to(device, torch.float32).reshape(bh) * fac
    return None if fac == 1.0 else torch.full((bh,), fac, device=device)


def _token_scale(codes: Codes) -> torch.Tensor | None:
    """The per-token coefficient scale as [1, BH, T] (int8 storage), else None."""
    s = codes.scale
    return None if s is None or s.dim() == 2 else s.to(torch.float32).reshape(1, -1, s.shape[2])


def _fp8_factor(codes: Codes) -> float:
    return 256.0 if codes.coef.dtype == torch.float8_e4m3fn else 1.0


def _per_chunk_products(x: torch.Tensor, atoms: torch.Tensor, b: int) -> torch.Tensor:
    """x [BH, R, C, Dc] against atoms [G, C, N, Dc] -> x·Dᵀ [BH, R, C, N] (one GEMM per chunk for G = 1)."""
    bh, r, c, dc = x.shape
    a = atoms.to(torch.float32)
    if a.shape[0] == 1 and c == 1:
        return F.linear(x.view(bh * r, dc), a[0, 0]).view(bh, r, 1, -1)
    if a.shape[0] == 1:
        return torch.stack([F.linear(x[:, :, i].reshape(bh * r, dc), a[0, i]) for i in range(c)], 1).view(bh, c, r, -1).transpose(1, 2)
    return torch.einsum("xrcd,xcnd->xrcn", x, a.repeat(b, 1, 1, 1))


def _scores_post(qr: torch.Tensor, keys: Codes, b: int) -> tuple[Callable[[Codes, int], torch.Tensor], torch.Tensor | None]:
    """Post-RoPE key codes: (block -> scores [R, BH, Tb], q·mean [R, BH] or None, a shift of every coded score).

    Scores gather from the table q·Dᵀ [BH·C·N, R] (head scale folded in), weighted by the coefficients."""
    bh, r, d = qr.shape
    g, c, n, dc = keys.atoms.shape
    qd = _per_chunk_products(qr.view(bh, r, c, dc), keys.atoms, b)  # [BH, R, C, N]
    tab = torch.empty(bh, c, n, r, device=qr.device)
    hf = _head_factor(keys, _fp8_factor(keys), bh, qr.device)
    torch.mul(qd.permute(0, 2, 3, 1), 1.0 if hf is None else hf.view(bh, 1, 1, 1), out=tab)
    tab = tab.view(bh * c * n, r)
    off = _offsets(keys, True, torch.int32)
    mean = _mean_of(keys, qr.device)
    shift = None if mean is None else torch.einsum("xrd,xd->rx", qr, mean.expand(b, -1, -1).reshape(bh, d) if mean.shape[0] > 1 else mean.expand(bh, d))

    def scores(kc: Codes, t0: int) -> torch.Tensor:
        tb = kc.tokens
        idx = torch.add(kc.idx, off).view(bh * tb, -1)  # int32 rows of the table
        cf, _ = _coef_f32(kc.coef)
        s = F.embedding_bag(idx, tab, per_sample_weights=cf.reshape(idx.shape), mode="sum")  # [BH·Tb, R]
        out = torch.empty(r, bh, tb, device=qr.device)
        torch.mul(s.view(bh, tb, r).permute(2, 0, 1), 1.0, out=out)  # transpose into [R, BH, Tb]
        ts = _token_scale(kc)
        return out if ts is None else out.mul_(ts)

    return scores, shift


def _scores_pre(qr: torch.Tensor, keys: Codes, b: int, rp: Rope, pos0: torch.Tensor) -> Callable[[Codes, int], torch.Tensor]:
    """Pre-RoPE key codes: decode a block (scales and mean applied), rotate it to its positions
    with the cached cos/sin table, then one q·kᵀ product per head -> scores [R, BH, Tb]."""
    bh, r, d = qr.shape
    g, c, n, dc = keys.atoms.shape
    h = bh // b
    atoms = keys.atoms.to(torch.float32).reshape(g * c * n, dc)
    off = _offsets(keys, False, torch.int32)
    mean = _mean_of(keys, qr.device)
    mean = None if mean is None else (mean.expand(h, d).repeat(b, 1) if mean.shape[0] > 1 else mean.expand(bh, d)).reshape(bh, 1, d)
    hf = _head_factor(keys, _fp8_factor(keys), bh, qr.device)
    qr_rot = -_rope.rotate_half(qr)
    starts = [int(p) for p in pos0.reshape(-1).tolist()]
    starts = starts * b if len(starts) == 1 else starts

    def scores(kc: Codes, t0: int) -> torch.Tensor:
        tb = kc.tokens
        idx = torch.add(kc.idx, off).view(-1, kc.idx.shape[-1])  # int32 [BH·Tb·C, S] rows of the atoms
        cf, _ = _coef_f32(kc.coef)
        ts = _token_scale(kc)
        if ts is not None:
            cf = cf * ts.view(b, h, tb, 1, 1)
        if hf is not None:
            cf = cf.view(bh, -1).mul_(hf[:, None])
        k = F.embedding_bag(idx, atoms, per_sample_weights=cf.reshape(idx.shape), mode="sum").view(b, h, tb, d)
        if mean is not None:
            k.add_(mean.view(b, h, 1, d))
        # q·R(p)k = q·(k·cos) + q'·(k·sin) with q' = -rotate_half(q): two products per head
        x = torch.empty(2, b, h, tb, d, device=qr.device)
        for i, p0 in enumerate(starts):
            torch.mul(k[i], rp.table(p0 + t0, tb, qr.device)[:, None], out=x[:, i])
        x = x.view(2, bh, tb, d)
        s = torch.baddbmm(torch.bmm(qr, x[0].transpose(1, 2)), qr_rot, x[1].transpose(1, 2))  # [BH, R, Tb]
        return s.transpose(0, 1).contiguous()

    return scores


class _AtomMass:
    """Values in atom space: A[r, (b, h, c, n)] = Σ_t,s p[r, t]·coef[t, c, s] over the tokens with idx = n.

    Indices and coefficients are laid out [C·S, BH·Tb] so that the weight x coefficient
    product runs along the tokens (contiguous), then one scatter_add for all of them."""

    def __init__(self, values: Codes, r: int):
        b, h, _, c, _ = values.idx.shape
        self.values, self.r, self.b = values, r, b
        self.off = _offsets(values, True, torch.int64).permute(3, 4, 0, 1, 2)  # [C, 1, B, H, 1]
        self.mass = torch.zeros(r, b * h * c * values.atoms.shape[2], device=values.idx.device)

    def add(self, vc: Codes, p: torch.Tensor) -> None:
        """Accumulate the weights p [R, BH, Tb] of the tokens of vc."""
        r = self.r
        b, h, tb, c, s = vc.idx.shape
        kk, m = c * s, b * h * tb
        idx = torch.empty(c, s, b, h, tb, dtype=torch.int64, device=p.device)
        torch.add(vc.idx.permute(3, 4, 0, 1, 2), self.off, out=idx)
        cf, _ = _coef_f32(vc.coef.permute(3, 4, 0, 1, 2))  # [C, S, B, H, Tb]
        ts = _token_scale(vc)
        if ts is not None:
            p = p * ts
        src = p.view(r, 1, m) * cf.view(1, kk, m)  # [R, C·S, BH·Tb]
        self.mass.scatter_add_(1, idx.view(1, kk * m).expand(r, -1), src.view(r, kk * m))

    def out(self, l: torch.Tensor) -> torch.Tensor:
        """Σ_t p·v [R, BH, D]: one [N] x [Dc] product per chunk (per head for G = H), plus Σp·mean (l [R, BH])."""
        b, h, _, c, _ = self.values.idx.shape
        g, _, n, dc = self.values.atoms.shape
        bh = b * h
        am = self.mass.view(self.r, bh, c, n)
        atoms = self.values.atoms.to(torch.float32)
        if g == 1 and c == 1:
            out = (self.mass.view(self.r * bh, n) @ atoms[0, 0]).view(self.r, bh, dc)
        elif g == 1:
            out = torch.stack([am[:, :, i].reshape(self.r * bh, n) @ atoms[0, i] for i in range(c)], 1).view(self.r, bh, c * dc)
        else:
            out = torch.einsum("rxcn,xcnd->rxcd", am, atoms.repeat(b, 1, 1, 1)).reshape(self.r, bh, c * dc)
        hf = _head_factor(self.values, _fp8_factor(self.values), bh, out.device)
        if hf is not None:
            out.mul_(hf.view(1, bh, 1))
        mean = _mean_of(self.values, out.device)
        if mean is not None:
            out = out + l[..., None] * (mean.expand(h, -1).repeat(b, 1) if mean.shape[0] > 1 else mean)[None]
        return out


def _mask_rows(s: torch.Tensor, ok: torch.Tensor | None, rep: int, tq: int, b: int) -> torch.Tensor:
    """Scores s [R, BH, T] with -inf where ok [B, Tq, T] is False (rows are (rep, tq), heads (b, h))."""
    if ok is None:
        return s
    r, bh, t = s.shape
    return s.view(rep, tq, b, bh // b, t).masked_fill_(~ok.permute(1, 0, 2)[None, :, :, None, :], float("-inf")).view(r, bh, t)


def _finite(m: torch.Tensor) -> torch.Tensor:
    """A running max fit to subtract: -inf (nothing seen yet) becomes -1e30, so exp(-inf - it) = 0, never NaN."""
    return m.clamp_min(-1e30)


def _dense(qr, dense: Sequence[Segment], valid, q_start, window, rep, tq, b):
    """The dense tokens as one part: (m, l [R, BH], Σ p·v [R, BH, D])."""
    bh, r, d = qr.shape
    segs = [s for s in dense if s.k.shape[2]]
    k = torch.cat([s.k for s in segs], 2) if len(segs) > 1 else segs[0].k
    v = torch.cat([s.v for s in segs], 2) if len(segs) > 1 else segs[0].v
    t = k.shape[2]
    slots = lambda: torch.cat([torch.arange(s.start, s.start + s.k.shape[2], device=qr.device) for s in segs])  # noqa: E731
    lo, hi = min(s.start for s in segs), max(s.start + s.k.shape[2] - 1 for s in segs)
    s = torch.bmm(qr, k.to(torch.float32).reshape(bh, t, d).transpose(1, 2)).transpose(0, 1).contiguous()  # [R, BH, T]
    s = _mask_rows(s, _allowed(slots, lo, hi, valid, q_start, tq, window, b), rep, tq, b)
    m = s.amax(-1)
    p = torch.exp(s - _finite(m)[..., None])
    out = torch.bmm(p.transpose(0, 1), v.to(torch.float32).reshape(bh, t, d)).transpose(0, 1)  # [R, BH, D]
    return m, p.sum(-1), out


def _coded(qr, keys: Codes, values: Codes, start, rp, pos0, valid, q_start, window, rep, tq, block, b):
    """The coded tokens in blocks with an online softmax: (m, l [R, BH], Σ p·v [R, BH, D])."""
    bh, r, d = qr.shape
    dev = qr.device
    shift = None
    if rp is None:
        scores, shift = _scores_post(qr, keys, b)
    else:
        scores = _scores_pre(qr, keys, b, rp, pos0)
    mass = _AtomMass(values, r)
    m = torch.full((r, bh), float("-inf"), device=dev)
    l = torch.zeros(r, bh, device=dev)
    t_all = keys.tokens
    first = 0 if window is None else max(0, q_start - window + 1 - start)  # tokens before `first` are out of every query's window
    for t0 in range(first, t_all, block):
        t1 = min(t_all, t0 + block)
        s = scores(keys.slice(t0, t1), t0)  # [R, BH, Tb]
        slots = lambda: torch.arange(start + t0, start + t1, device=dev)  # noqa: E731
        s = _mask_rows(s, _allowed(slots, start + t0, start + t1 - 1, valid, q_start, tq, window, b), rep, tq, b)
        m_new = torch.maximum(m, s.amax(-1))
        safe = _finite(m_new)
        p = s.sub_(safe[..., None]).exp_()
        if t0 > first:
            alpha = torch.exp(m - safe)  # rescales what is accumulated so far
            l.mul_(alpha)
            mass.mass.view(r, bh, -1).mul_(alpha[..., None])
        l += p.sum(-1)
        mass.add(values.slice(t0, t1), p)
        m = m_new
    out = mass.out(l)
    return (m if shift is None else m + shift), l, out


def attend(
    q: torch.Tensor,
    keys: Codes | None,
    values: Codes | None,
    dense: Sequence[Segment] = (),
    coded_start: int = 0,
    *,
    rope: Rope | None = None,
    key_pos0: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    q_start: int = 0,
    window: int | None = None,
    scale: float | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Softmax attention of q over a coded history plus dense segments, without rebuilding the history.

    q [B, Hq, Tq, D]: post-RoPE queries (Hq = rep·H); query i sits at slot q_start + i.
    keys, values: Codes of the same T coded tokens at slots coded_start..coded_start+T-1
        (or both None). Keys are post-RoPE codes, or pre-RoPE when `rope` is given: then
        coded token t of sequence b is rotated at position key_pos0[b] + t (key_pos0 [B]
        or [1] int; positions < 0 only for padding).
    dense: Segments of dense tokens (sink, window, the new tokens), post-RoPE keys.
    valid: None or bool [B, ≥ last slot + 1], False for padding. Causal: a key is seen
        by a query iff key slot <= query slot (and > query slot - window when `window`).
    scale: softmax scale (default D^-0.5). block: coded tokens per step of the online
        softmax (default from POST_BLOCK_ELEMS / PRE_BLOCK_ELEMS and the batch, heads, rows).
    Returns [B, Hq, Tq, D] in q's dtype; a query that sees no key gets zeros.
    """
    b, hq, tq, d = q.shape
    heads = keys.idx.shape[1] if keys is not None else dense[0].k.shape[1]
    rep = _check(q, heads)
    r = rep * tq
    sc = d**-0.5 if scale is None else scale
    # the query rows of each KV head: [BH, R, D], row = (rep_i, tq_i), pre-scaled by the softmax scale
    qr = (q.to(torch.float32) * sc).reshape(b * heads, r, d)
    if block is None:
        per_token = b * heads * (r if rope is None else 1)
        block = max(256, (POST_BLOCK_ELEMS if rope is None else PRE_BLOCK_ELEMS) // per_token)
    parts = []  # (m [R, BH], l [R, BH], unnormalised output [R, BH, D])
    if keys is not None and keys.tokens:
        parts.append(_coded(qr, keys, values, coded_start, rope, key_pos0, valid, q_start, window, rep, tq, block, b))
    if any(s.k.shape[2] for s in dense):
        parts.append(_dense(qr, dense, valid, q_start, window, rep, tq, b))
    if not parts:
        return torch.zeros_like(q)
    m, l, acc = parts[0]
    for pm, pl, po in parts[1:]:
        m_new = torch.maximum(m, pm)
        safe = _finite(m_new)
        alpha, beta = torch.exp(m - safe), torch.exp(pm - safe)
        l = l * alpha + pl * beta
        acc = acc * alpha[..., None] + po * beta[..., None]
        m = m_new
    out = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]  # [R, BH, D]
    return out.transpose(0, 1).reshape(b, hq, tq, d).to(q.dtype)
