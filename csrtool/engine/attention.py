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

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from csrtool.engine import rope as _rope

DEFAULT_BLOCK = 8192  # coded tokens per block: bounds the temporaries (about 60 bytes per token and query row)


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


# ---------------------------------------------------------------- shared pieces


def _scale_of(codes: Codes, t0: int = 0, t1: int | None = None) -> torch.Tensor | None:
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
    coef = codes.coef.to(torch.float32)
    sc = _scale_of(codes)
    if sc is not None:
        coef = coef * sc[..., None, None]
    atoms = codes.atoms.to(torch.float32)  # [G, C, N, Dc]
    heads = torch.arange(h, device=codes.idx.device) if g > 1 else torch.zeros(h, dtype=torch.long, device=codes.idx.device)
    off = (heads[:, None] * c + torch.arange(c, device=heads.device)[None, :]) * n  # [H, C]
    flat = codes.idx.to(torch.int64) + off[None, :, None, :, None]
    out = F.embedding_bag(flat.reshape(-1, s), atoms.reshape(g * c * n, dc), per_sample_weights=coef.reshape(-1, s), mode="sum")
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


def _allowed(slots: torch.Tensor, lo: int, hi: int, valid, q_start: int, tq: int, window: int | None, batch: int) -> torch.Tensor | None:
    """Bool [B, Tq, T] (True = attend) for keys at `slots` [T] (all within lo..hi); None when every key is allowed."""
    if valid is None and hi <= q_start and (window is None or lo > q_start + tq - 1 - window):
        return None
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
    ok = _allowed(s_all, lo, hi, valid, q_start, tq, window, b)
    if ok is not None:
        scores = scores.masked_fill(~ok[:, None], float("-inf"))
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = p.sum(-1, keepdim=True)
    out = (p @ v_all) / torch.where(l > 0, l, torch.ones_like(l))
    return out.to(q.dtype)


# ---------------------------------------------------------------- on the codes


def _flat_index(codes: Codes, per_batch: bool) -> torch.Tensor:
    """idx [B, H, T, C, S] -> int64 rows into a flat table: [(b·)H·C·N, ...] (per_batch) or [G·C·N, ...]."""
    b, h, t, c, s = codes.idx.shape
    n = codes.atoms.shape[2]
    dev = codes.idx.device
    if per_batch:
        off = torch.arange(b * h * c, device=dev, dtype=torch.int64).reshape(b, h, 1, c, 1) * n
    else:
        heads = torch.arange(h, device=dev) if codes.atoms.shape[0] > 1 else torch.zeros(h, dtype=torch.long, device=dev)
        off = ((heads[:, None] * c + torch.arange(c, device=dev)[None, :]) * n).reshape(1, h, 1, c, 1)
    return codes.idx.to(torch.int64) + off


def _key_table(qr: torch.Tensor, codes: Codes) -> torch.Tensor:
    """q·Dᵀ per (b, h, chunk): qr [B, H, R, D] -> [B·H·C·N, R] (the table the key indices gather from)."""
    b, h, r, d = qr.shape
    g, c, n, dc = codes.atoms.shape
    qc = qr.reshape(b, h, r, c, dc)
    atoms = codes.atoms.to(torch.float32)
    if g == 1:
        tab = torch.einsum("bhrcd,cnd->bhcnr", qc, atoms[0])
    else:
        tab = torch.einsum("bhrcd,hcnd->bhcnr", qc, atoms)
    return tab.reshape(b * h * c * n, r)


def _mean_dot(qr: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor | None:
    """q·mean [B, H, R] (mean [1 or H, D])."""
    if mean is None:
        return None
    return torch.einsum("bhrd,hd->bhr", qr, mean.expand(qr.shape[1], -1))


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
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Softmax attention of q over a coded history plus dense segments, without rebuilding the history.

    q [B, Hq, Tq, D]: post-RoPE queries (Hq = rep·H); query i sits at slot q_start + i.
    keys, values: Codes of the same T coded tokens at slots coded_start..coded_start+T-1
        (or both None). Keys are post-RoPE codes, or pre-RoPE when `rope` is given: then
        coded token t of sequence b is rotated at position key_pos0[b] + t (key_pos0 [B] int).
    dense: Segments of dense tokens (sink, window, the new tokens), post-RoPE keys.
    valid: None or bool [B, ≥ last slot + 1], False for padding. Causal: a key is seen
        by a query iff key slot <= query slot (and > query slot - window when `window`).
    scale: softmax scale (default D^-0.5). block: coded tokens per step of the online softmax.
    Returns [B, Hq, Tq, D] in q's dtype; a query that sees no key gets zeros.
    """
    b, hq, tq, d = q.shape
    dev = q.device
    heads = keys.idx.shape[1] if keys is not None else dense[0].k.shape[1]
    rep = _check(q, heads)
    r = rep * tq
    sc = d**-0.5 if scale is None else scale
    # query rows of one KV head: [B, H, R, D], row = (rep_i, tq_i); pre-scaled by the softmax scale
    qr = q.to(torch.float32).reshape(b, heads, rep, tq, d).reshape(b, heads, r, d) * sc
    neg = torch.full((b, heads, r), float("-inf"), device=dev)
    parts = []  # (m [B, H, R], l [B, H, R], unnormalised out [B, H, R, D])
    if keys is not None and keys.tokens:
        parts.append(_coded(qr, keys, values, coded_start, rope, key_pos0, valid, q_start, window, rep, tq, block))
    for seg in dense:
        if seg.k.shape[2]:
            parts.append(_dense(qr, seg, valid, q_start, window, rep, tq))
    m = neg
    for pm, _, _ in parts:
        m = torch.maximum(m, pm)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    l = torch.zeros_like(m)
    acc = torch.zeros(b, heads, r, d, device=dev)
    for pm, pl, po in parts:
        w = torch.exp(pm - m_safe)  # 0 for a part with no allowed key
        l = l + w * pl
        acc = acc + w[..., None] * po
    out = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    return out.reshape(b, heads, rep, tq, d).reshape(b, hq, tq, d).to(q.dtype)


def _softmax_part(s: torch.Tensor, ok: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores s [B, H, T, rep, Tq] -> (m [B, H, rep, Tq] max over T, p = exp(s - m), masked to 0)."""
    if ok is not None:
        s = s.masked_fill(~ok.transpose(1, 2)[:, None, :, None, :], float("-inf"))
    m = s.amax(2)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m, torch.exp(s - m_safe[:, :, None])


def _dense(qr, seg: Segment, valid, q_start, window, rep, tq):
    b, h, r, d = qr.shape
    t = seg.k.shape[2]
    s = (seg.k.to(torch.float32) @ qr.transpose(-1, -2)).reshape(b, h, t, rep, tq)  # [B, H, T, R]
    ok = _allowed(torch.arange(seg.start, seg.start + t, device=qr.device), seg.start, seg.start + t - 1, valid, q_start, tq, window, b)
    m, p = _softmax_part(s, ok)
    p = p.reshape(b, h, t, r)
    return m.reshape(b, h, r), p.sum(2), p.transpose(-1, -2) @ seg.v.to(torch.float32)


def _coded(qr, keys: Codes, values: Codes, start, rp, pos0, valid, q_start, window, rep, tq, block):
    b, h, r, d = qr.shape
    dev = qr.device
    gv, cv, nv, dcv = values.atoms.shape
    t_all = keys.tokens
    kmean = _mean_of(keys, dev)
    vmean = _mean_of(values, dev)
    qm = _mean_dot(qr, kmean) if rp is None else None
    table = _key_table(qr, keys) if rp is None else None
    m = torch.full((b, h, r), float("-inf"), device=dev)
    l = torch.zeros(b, h, r, device=dev)
    amass = torch.zeros(b * h * cv * nv, r, device=dev)  # Σ w·coef per atom: [B·H·C·N, R]
    for t0 in range(0, t_all, block):
        t1 = min(t_all, t0 + block)
        kc, vc = keys.slice(t0, t1), values.slice(t0, t1)
        tb = t1 - t0
        ksc = _scale_of(kc)
        if rp is None:
            kidx = _flat_index(kc, per_batch=True).reshape(-1, kc.idx.shape[3] * kc.idx.shape[4])
            s = F.embedding_bag(kidx, table, per_sample_weights=kc.coef.to(torch.float32).reshape(kidx.shape), mode="sum")
            s = s.reshape(b, h, tb, r)
            if ksc is not None:
                s = s * ksc[..., None]
            if qm is not None:
                s = s + qm[:, :, None, :]
        else:
            k = reconstruct(kc)  # [B, H, Tb, D], scale and mean applied
            k = _rotate_keys(k, pos0, t0, rp)
            s = k @ qr.transpose(-1, -2)  # [B, H, Tb, R]
        ok = _allowed(torch.arange(start + t0, start + t1, device=dev), start + t0, start + t1 - 1, valid, q_start, tq, window, b)
        bm, p = _softmax_part(s.reshape(b, h, tb, rep, tq), ok)
        bm = bm.reshape(b, h, r)
        p = p.reshape(b, h, tb, r)
        m_new = torch.maximum(m, bm)
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha = torch.exp(m - m_safe)  # rescale what is accumulated so far
        beta = torch.exp(torch.where(torch.isfinite(bm), bm, m_safe) - m_safe)  # p was taken against bm
        p = p * beta[:, :, None, :]
        l = l * alpha + p.sum(2)
        amass.view(b, h, cv * nv, r).mul_(alpha[:, :, None, :])
        vsc = _scale_of(vc)
        pv = p if vsc is None else p * vsc[..., None]  # [B, H, Tb, R]
        vidx = _flat_index(vc, per_batch=True).reshape(-1)
        src = (pv[:, :, :, None, None, :] * vc.coef.to(torch.float32)[..., None]).reshape(-1, r)
        amass.index_add_(0, vidx, src)
        m = m_new
    # one [N] x [Dc] product per head and chunk
    am = amass.view(b, h, cv, nv, r)
    atoms = values.atoms.to(torch.float32)
    if gv == 1:
        out = torch.einsum("bhcnr,cnd->bhrcd", am, atoms[0])
    else:
        out = torch.einsum("bhcnr,hcnd->bhrcd", am, atoms)
    out = out.reshape(b, h, r, cv * dcv)
    if vmean is not None:
        out = out + l[..., None] * vmean.expand(h, -1)[None, :, None, :]
    return m, l, out
