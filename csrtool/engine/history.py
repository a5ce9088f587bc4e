"""A layer's history as a cache holds it (coded tokens + dense tokens), and attention over it
by reconstruction: the reference that engine/attention.py's attention on the codes must match.

    Codes(idx, coef, atoms, scale=None, mean=None, pred=None)   one side (K or V): codes of T tokens
    Pred(table, rows, scale=None, channel=None)          a per-token vector added to decoded tokens (token predictor)
    Segment(k, v, start)                                 dense tokens at slots start..
    Rope(inv_freq, scaling=1.0)                          re-rotation of pre-RoPE keys (cached cos/sin)
    reconstruct(codes) -> [B, H, T, C·Dc] float32         decode one side (scale and mean applied)
    attend_reference(q, keys, values, dense, coded_start, **where) -> [B, Hq, Tq, D]   (where: attend's keywords)
    allowed(slots, lo, hi, valid, q_start, tq, window, B) -> bool [B, Tq, T] | None

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


@dataclass(frozen=True)
class Pred:
    """A per-token part added to decoded vectors, looked up in a table (the token predictor's prediction):
    token t of sequence b, head h gets table[h, rows[b, t]] (times scale[h, rows[b, t]] when scaled, times
    channel[h] when given).

    table [H, R, D] float, or int8 with scale [H, R] float (one scale per row); rows [B, T] integer < R
    (tokens sharing a row share the vector); channel None or [H, D] float (a scale per channel, every row's).
    """

    table: torch.Tensor
    rows: torch.Tensor
    scale: torch.Tensor | None = None
    channel: torch.Tensor | None = None

    def slice(self, t0: int, t1: int) -> "Pred":
        return Pred(self.table, self.rows[:, t0:t1], self.scale, self.channel)

    def dense(self) -> torch.Tensor:
        """[B, H, T, D] float32: each token's vector."""
        rows = self.rows.to(torch.int64)
        out = self.table[:, rows].to(torch.float32)
        if self.scale is not None:
            out = out * self.scale[:, rows].to(torch.float32)[..., None]
        if self.channel is not None:
            out = out * self.channel.to(torch.float32)[:, None, None, :]
        return out.transpose(0, 1)

    def full(self) -> torch.Tensor:
        """[H, R, D] float32: the whole table."""
        out = self.table.to(torch.float32)
        if self.scale is not None:
            out = out * self.scale.to(torch.float32)[..., None]
        return out if self.channel is None else out * self.channel.to(torch.float32)[:, None, :]


@dataclass(frozen=True)
class Codes:
    """Sparse codes of T tokens of one layer side (keys or values), as a cache holds them.

    idx   [B, H, T, C, S]  int16 / int32 / int64 (uint8 when N <= 256): atom indices < N.
    coef  [B, H, T, C, S]  float32 / float16 / bfloat16 / float8_e4m3fn / int8.
    atoms [G, C, N, Dc]    float, unit rows; G = H or 1.
    scale None, [B, H] or [B, H, T] float: the coefficient is coef · scale (the .csr's
          per-(batch, head) float32 scale g; for int8 coefficients pass g·v [B, H, T]).
    mean  None or [G, C·Dc]: added to every decoded vector (centred dictionaries).
    pred  None or Pred (table [H, R, C·Dc] (int8 with a scale per row, or float), rows [B, T]): added to each decoded vector.
    """

    idx: torch.Tensor
    coef: torch.Tensor
    atoms: torch.Tensor
    scale: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    pred: Pred | None = None

    def __post_init__(self) -> None:
        assert self.idx.dim() == 5 and self.idx.shape == self.coef.shape, (tuple(self.idx.shape), tuple(self.coef.shape))
        assert self.atoms.dim() == 4 and self.atoms.shape[1] == self.idx.shape[3], (tuple(self.atoms.shape), tuple(self.idx.shape))
        assert self.atoms.shape[0] in (1, self.idx.shape[1]), (tuple(self.atoms.shape), tuple(self.idx.shape))
        if self.pred is not None:
            assert self.pred.rows.shape == self.idx.shape[:1] + self.idx.shape[2:3], (tuple(self.pred.rows.shape), tuple(self.idx.shape))
            assert self.pred.table.shape[0] == self.idx.shape[1], (tuple(self.pred.table.shape), tuple(self.idx.shape))

    @property
    def tokens(self) -> int:
        return self.idx.shape[2]

    def slice(self, t0: int, t1: int) -> "Codes":
        """Tokens t0..t1-1 (views, no copy)."""
        s = self.scale
        if s is not None and s.dim() == 3:
            s = s[:, :, t0:t1]
        pred = None if self.pred is None else self.pred.slice(t0, t1)
        return Codes(self.idx[:, :, t0:t1], self.coef[:, :, t0:t1], self.atoms, s, self.mean, pred)


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


def scale_of(codes: Codes) -> torch.Tensor | None:
    """The coefficient scale broadcastable to [B, H, T]."""
    s = codes.scale
    if s is None:
        return None
    s = s.to(torch.float32)
    return s[:, :, None] if s.dim() == 2 else s


def mean_of(codes: Codes, device) -> torch.Tensor | None:
    """mean as [1 or H, D] float32."""
    return None if codes.mean is None else codes.mean.to(device, torch.float32)


def reconstruct(codes: Codes) -> torch.Tensor:
    """Decode one side: [B, H, T, C·Dc] float32 = Σ coef·scale·atom (+ mean) (+ pred)."""
    b, h, t, c, s = codes.idx.shape
    g, _, n, dc = codes.atoms.shape
    cf, fac = coef_f32(codes.coef)
    sc = scale_of(codes)
    cf = cf * (fac if sc is None else sc[..., None, None] * fac)
    idx = (codes.idx.to(torch.int64) + row_offsets(codes, False, torch.int64)).reshape(-1, s)
    out = F.embedding_bag(idx, codes.atoms.to(torch.float32).reshape(g * c * n, dc), per_sample_weights=cf.reshape(-1, s), mode="sum")
    out = out.reshape(b, h, t, c * dc)
    mean = mean_of(codes, out.device)
    if mean is not None:
        out = out + mean[None, :, None, :]
    return out if codes.pred is None else out + codes.pred.dense()


def _rotate_keys(k: torch.Tensor, pos0: torch.Tensor, t0: int, rp: Rope) -> torch.Tensor:
    """RoPE on k [B, H, T, D] (float32): token t of sequence b at position pos0[b] + t0 + t."""
    b, h, t, d = k.shape
    pos = pos0.to(k.device, torch.float32)[:, None] + torch.arange(t0, t0 + t, device=k.device, dtype=torch.float32)[None, :]
    cos, sin = _rope.cos_sin(rp.inv_freq, pos.reshape(-1), rp.scaling)  # [B*T, D]
    cos, sin = cos.reshape(b, 1, t, d), sin.reshape(b, 1, t, d)
    return k * cos + _rope.rotate_half(k) * sin


def allowed(slots: Callable[[], torch.Tensor], lo: int, hi: int, valid, q_start: int, tq: int, window: int | None, batch: int) -> torch.Tensor | None:
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


def query_groups(q: torch.Tensor, heads: int) -> int:
    b, hq, tq, d = q.shape
    assert hq % heads == 0, (hq, heads)
    return hq // heads


def coef_f32(c: torch.Tensor) -> tuple[torch.Tensor, float]:
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


def row_offsets(codes: Codes, per_batch: bool, dtype: torch.dtype) -> torch.Tensor:
    """Row offsets into a flat table, [B or 1, H, 1, C, 1]: ((b·H + h)·C + c)·N (per_batch) or (g·C + c)·N."""
    b, h, _, c, _ = codes.idx.shape
    n = codes.atoms.shape[2]
    dev = codes.idx.device
    if per_batch:
        return (torch.arange(b * h * c, device=dev, dtype=dtype) * n).reshape(b, h, 1, c, 1)
    g = codes.atoms.shape[0]
    heads = torch.arange(h, device=dev, dtype=dtype) if g > 1 else torch.zeros(h, device=dev, dtype=dtype)
    return ((heads[:, None] * c + torch.arange(c, device=dev, dtype=dtype)[None, :]) * n).reshape(1, h, 1, c, 1)


WHERE = ("rope", "key_pos0", "valid", "q_start", "window", "scale")  # attend's keyword arguments that place the tokens


def attend_reference(
    q: torch.Tensor, keys: Codes | None, values: Codes | None, dense: Sequence[Segment] = (), coded_start: int = 0, **where
) -> torch.Tensor:
    """Reconstruct-then-attend: decode every coded token to a dense key/value, then plain softmax attention.

    Same arguments and result as engine.attention.attend (`where`: its keyword arguments
    rope, key_pos0, valid, q_start, window, scale); kept as the reference (O(T·D) memory)."""
    unknown = set(where) - set(WHERE) - {"block"}
    if unknown:
        raise TypeError(f"attend_reference() got unexpected keyword arguments {sorted(unknown)}")
    rope, key_pos0, valid, window, scale = (where.get(k) for k in ("rope", "key_pos0", "valid", "window", "scale"))
    q_start = where.get("q_start", 0)
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
    rep = query_groups(q, k_all.shape[1])
    k_all = k_all.repeat_interleave(rep, dim=1)
    v_all = v_all.repeat_interleave(rep, dim=1)
    sc = d**-0.5 if scale is None else scale
    scores = (q.to(torch.float32) @ k_all.transpose(-1, -2)) * sc  # [B, Hq, Tq, T]
    lo, hi = (int(s_all.min()), int(s_all.max())) if s_all.numel() else (0, 0)
    ok = allowed(lambda: s_all, lo, hi, valid, q_start, tq, window, b)
    if ok is not None:
        scores = scores.masked_fill(~ok[:, None], float("-inf"))
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = p.sum(-1, keepdim=True)
    out = (p @ v_all) / torch.where(l > 0, l, torch.ones_like(l))
    return out.to(q.dtype)
