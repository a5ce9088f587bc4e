"""Attention on the codes: one decode step (or a few query tokens) over a coded history.

The history of one layer is coded tokens (a key code and a value code per token and
KV head) plus dense verbatim tokens (sink, full-precision window, the new tokens).
The dense history is never rebuilt (docs/attention.md):

- post-RoPE keys: scores = Σ_s coef_s · (q·Dᵀ)[idx_s]  (+ q·mean): one [R, N] product
  per head, then a weighted gather (embedding_bag) over the tokens' indices;
- pre-RoPE keys: a block of keys is decoded, rotated to its positions and dotted
  with q; only one block is ever dense;
- values: the softmax weights times the coefficients are scattered into atom space
  A [R, C, N] (scatter_add), then one A·D product per head; the mean adds Σw·mean.

Coded tokens go in blocks with an online softmax (running max and sum), merged with
the dense part by log-sum-exp, so memory stays O(block + N) at any length.

    attend(q, keys, values, dense, coded_start, *, rope, key_pos0, valid, q_start, window, scale, block)
        -> [B, Hq, Tq, D]
    Codes, Pred, Segment, Rope, reconstruct, attend_reference   from engine/history.py (re-exported)

A token predictor's part (Codes.pred: a table of vectors and each token's row) costs
O(T) per step, not O(T·D): post-RoPE keys add (q·tableᵀ)[row] to the scores, pre-RoPE
keys add the rows to the decoded block, values scatter the weights onto the rows
([R, BH, rows]) and take one product with the table at the end.

Shapes: B batch, Hq = rep·H query heads, H KV heads, Tq query tokens, T coded
tokens, C channel chunks, S atoms per chunk, N atoms, D = C·Dc head_dim, G = H
(a dictionary per head) or 1 (shared). Slots are cache positions (0 = first token
of the cache), the same for every sequence of the batch; `valid` marks real tokens
(left padding = False). Math is float32 whatever the storage dtypes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from csrtool.engine import rope as _rope
from csrtool.engine.history import (  # noqa: F401  (Codes, Segment, Rope, reconstruct, attend_reference: the public API)
    Codes,
    Pred,
    Rope,
    Segment,
    allowed,
    attend_reference,
    coef_f32,
    mean_of,
    query_groups,
    reconstruct,
    row_offsets,
)

# Coded tokens per block of the online softmax, from the size of its temporaries:
# post-RoPE keys ~40 bytes per (token, head, query row); pre-RoPE keys ~1.5 KB per (token, head)
# for the decoded and rotated keys. Measured on a 2-core CPU (docs/attention.md): fewer,
# larger blocks win for post-RoPE keys (a block costs ~40 torch calls); pre-RoPE keys
# want the rotated block to stay near the caches.
POST_BLOCK_ELEMS = 9 * 32768  # tokens x heads x query rows
PRE_BLOCK_ELEMS = 3 * 4096  # tokens x heads


# ---------------------------------------------------------------- on the codes
#
# Layout: the R = rep·Tq query rows of a KV head first, then the B·H heads, then tokens:
# scores [R, BH, T] so that every reduction over tokens runs along contiguous memory.
# Per-(batch, head) coefficient scales and the fp8 factor fold into the small tables
# (q·Dᵀ for post-RoPE keys, the atom mass for values; pre-RoPE keys take them on their
# coefficients, before the mean is added), so the per-token work is: widen the
# indices, widen the coefficients, gather, exp, scatter.


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
    return torch.einsum("bhrcd,hcnd->bhrcn", x.view(b, bh // b, r, c, dc), a).reshape(bh, r, c, -1)


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
    off = row_offsets(keys, True, torch.int32)
    mean = mean_of(keys, qr.device)
    shift = None if mean is None else torch.einsum("xrd,xd->rx", qr, mean.expand(b, -1, -1).reshape(bh, d) if mean.shape[0] > 1 else mean.expand(bh, d))
    qp = None  # q·tableᵀ [BH, R, rows] for the token predictor's part
    if keys.pred is not None:
        h = bh // b
        qp = torch.einsum("bhrd,hnd->bhrn", qr.view(b, h, r, d), keys.pred.full()).reshape(bh, r, -1)

    def scores(kc: Codes, t0: int) -> torch.Tensor:
        tb = kc.tokens
        idx = torch.add(kc.idx, off).view(bh * tb, -1)  # int32 rows of the table
        cf, _ = coef_f32(kc.coef)
        s = F.embedding_bag(idx, tab, per_sample_weights=cf.reshape(idx.shape), mode="sum")  # [BH·Tb, R]
        out = torch.empty(r, bh, tb, device=qr.device)
        torch.mul(s.view(bh, tb, r).permute(2, 0, 1), 1.0, out=out)  # transpose into [R, BH, Tb]
        ts = _token_scale(kc)
        if ts is not None:
            out.mul_(ts)
        if qp is not None:
            rows = kc.pred.rows.to(torch.int64)[:, None, None, :].expand(b, bh // b, r, tb).reshape(bh, r, tb)
            out += qp.gather(2, rows).transpose(0, 1)
        return out

    return scores, shift


def _scores_pre(qr: torch.Tensor, keys: Codes, b: int, rp: Rope, pos0: torch.Tensor) -> Callable[[Codes, int], torch.Tensor]:
    """Pre-RoPE key codes: decode a block (scales and mean applied), rotate it to its positions
    with the cached cos/sin table, then one q·kᵀ product per head -> scores [R, BH, Tb]."""
    bh, r, d = qr.shape
    g, c, n, dc = keys.atoms.shape
    h = bh // b
    atoms = keys.atoms.to(torch.float32).reshape(g * c * n, dc)
    off = row_offsets(keys, False, torch.int32)
    mean = mean_of(keys, qr.device)
    mean = None if mean is None else (mean.expand(h, d).repeat(b, 1) if mean.shape[0] > 1 else mean.expand(bh, d)).reshape(bh, 1, d)
    hf = _head_factor(keys, _fp8_factor(keys), bh, qr.device)
    qr_rot = -_rope.rotate_half(qr)
    starts = [int(p) for p in pos0.reshape(-1).tolist()]
    starts = starts * b if len(starts) == 1 else starts

    def scores(kc: Codes, t0: int) -> torch.Tensor:
        tb = kc.tokens
        idx = torch.add(kc.idx, off).view(-1, kc.idx.shape[-1])  # int32 [BH·Tb·C, S] rows of the atoms
        cf, _ = coef_f32(kc.coef)
        ts = _token_scale(kc)
        if ts is not None:
            cf = cf * ts.view(b, h, tb, 1, 1)
        if hf is not None:
            cf = cf.view(bh, -1).mul_(hf[:, None])
        k = F.embedding_bag(idx, atoms, per_sample_weights=cf.reshape(idx.shape), mode="sum").view(b, h, tb, d)
        if mean is not None:
            k.add_(mean.view(b, h, 1, d))
        if kc.pred is not None:
            k.add_(kc.pred.dense())
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
        self.off = row_offsets(values, True, torch.int64).permute(3, 4, 0, 1, 2)  # [C, 1, B, H, 1]
        self.mass = torch.zeros(r, b * h * c * values.atoms.shape[2], device=values.idx.device)
        pred = values.pred  # the token predictor's part: the weights summed per table row, [R, BH, rows]
        self.pmass = None if pred is None else torch.zeros(r, b * h, pred.table.shape[1], device=values.idx.device)

    def rescale(self, alpha: torch.Tensor) -> None:
        """Multiply what is accumulated by alpha [R, BH] (the online softmax's new max)."""
        self.mass.view(self.r, alpha.shape[1], -1).mul_(alpha[..., None])
        if self.pmass is not None:
            self.pmass.mul_(alpha[..., None])

    def add(self, vc: Codes, p: torch.Tensor) -> None:
        """Accumulate the weights p [R, BH, Tb] of the tokens of vc."""
        r = self.r
        b, h, tb, c, s = vc.idx.shape
        if self.pmass is not None:
            rows = vc.pred.rows.to(torch.int64)[:, None, :].expand(b, h, tb).reshape(1, b * h, tb).expand(r, -1, -1)
            self.pmass.scatter_add_(2, rows, p)
        kk, m = c * s, b * h * tb
        idx = torch.empty(c, s, b, h, tb, dtype=torch.int64, device=p.device)
        torch.add(vc.idx.permute(3, 4, 0, 1, 2), self.off, out=idx)
        cf, _ = coef_f32(vc.coef.permute(3, 4, 0, 1, 2))  # [C, S, B, H, Tb]
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
            out = torch.einsum("rbhcn,hcnd->rbhcd", am.view(self.r, b, h, c, n), atoms).reshape(self.r, bh, c * dc)
        hf = _head_factor(self.values, _fp8_factor(self.values), bh, out.device)
        if hf is not None:
            out.mul_(hf.view(1, bh, 1))
        mean = mean_of(self.values, out.device)
        if mean is not None:
            out = out + l[..., None] * (mean.expand(h, -1).repeat(b, 1) if mean.shape[0] > 1 else mean)[None]
        if self.pmass is not None:
            out = out + torch.einsum("rbhn,hnd->rbhd", self.pmass.view(self.r, b, h, -1), self.values.pred.full()).reshape(self.r, bh, -1)
        return out


def balanced_block(tokens: int, target: int) -> int:
    """Block size for `tokens` coded tokens near `target`: round(tokens / target) equal blocks (at least one),
    so no block is a tiny remainder (each block costs ~40 torch calls whatever its size; a block is at
    most 1.5x the target)."""
    if tokens <= 0:
        return target
    n = max(1, round(tokens / target))
    return -(-tokens // n)


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
    s = _mask_rows(s, allowed(slots, lo, hi, valid, q_start, tq, window, b), rep, tq, b)
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
        s = _mask_rows(s, allowed(slots, start + t0, start + t1 - 1, valid, q_start, tq, window, b), rep, tq, b)
        m_new = torch.maximum(m, s.amax(-1))
        safe = _finite(m_new)
        p = s.sub_(safe[..., None]).exp_()
        if t0 > first:
            alpha = torch.exp(m - safe)  # rescales what is accumulated so far
            l.mul_(alpha)
            mass.rescale(alpha)
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
        softmax (default: near POST_BLOCK_ELEMS / PRE_BLOCK_ELEMS over the batch, heads, rows, in equal blocks).
    Returns [B, Hq, Tq, D] in q's dtype; a query that sees no key gets zeros.
    """
    b, hq, tq, d = q.shape
    heads = keys.idx.shape[1] if keys is not None else dense[0].k.shape[1]
    rep = query_groups(q, heads)
    r = rep * tq
    sc = d**-0.5 if scale is None else scale
    # the query rows of each KV head: [BH, R, D], row = (rep_i, tq_i), pre-scaled by the softmax scale
    qr = (q.to(torch.float32) * sc).reshape(b * heads, r, d)
    if block is None:
        per_token = b * heads * (r if rope is None else 1)
        block = balanced_block(keys.tokens if keys is not None else 0, max(256, (POST_BLOCK_ELEMS if rope is None else PRE_BLOCK_ELEMS) // per_token))
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
