"""Bit-packing of atom indices and quantisation of coefficients (docs/format.md §3).

Pure torch, device-agnostic, no Python loop per element:

    index_bits(N) -> b = ceil(log2 N)
    pack_indices(idx [n] int, b) -> uint8 [ceil(n*b/8)]      LSB-first bit stream
    unpack_indices(buf uint8, n, b) -> int64 [n]
    pack_split(idx [..., K], b) -> (lo uint8 [..., K] | None, hi uint8 [..., ceil(K*w/8)])   in memory
    unpack_split(lo, hi, K, b, dtype) -> [..., K]
    quantize(coef [G, M, K], fmt) -> (q [G, M, K], g [G] f32, v [G, M] | None)
    dequantize(q, g, v, fmt) -> float32 [G, M, K]
    pack_narrow(q int [n], bits) -> uint8 / unpack_narrow(buf, n, bits) -> (int8 [n], ok)   int4/int3 fields

G groups share one float32 scale g; each of the M vectors has its own scale v
for the integer formats (int8: float16; int4, int3: fp8 e4m3fn); K = C*S
coefficients per vector.
"""

from __future__ import annotations

import math

import torch

COEF_FORMATS = ("fp16", "fp8", "int8", "int4", "int3")
COEF_BITS = {"fp16": 16, "fp8": 8, "int8": 8, "int4": 4, "int3": 3}
VECTOR_SCALE_BITS = {"fp16": 0, "fp8": 0, "int8": 16, "int4": 8, "int3": 8}
NARROW_LEVELS = {"int4": 7, "int3": 3}  # symmetric integer levels, one fp8 scale per vector
VECTOR_SCALE_DTYPE = {"int8": torch.float16, "int4": torch.float8_e4m3fn, "int3": torch.float8_e4m3fn}  # formats with a scale per vector: its type
_STORE_DTYPE = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.int8, "int3": torch.int8}
FP8_MAX = 448.0
FP16_LIMIT = 32768.0
INT8_MAX = 127


def index_bits(n_atoms: int) -> int:
    """Bits per index: ceil(log2 N), at least 1."""
    assert n_atoms >= 2, n_atoms
    return max(1, math.ceil(math.log2(n_atoms)))


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


CHUNK = 1 << 18  # elements per step: a multiple of 8, so every chunk ends on a byte boundary


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack n non-negative integers < 2**bits into ceil(n*bits/8) bytes, LSB first."""
    idx = idx.reshape(-1)
    n = idx.numel()
    if n > CHUNK:
        return torch.cat([_pack(idx[s : s + CHUNK].to(torch.int64), bits) for s in range(0, n, CHUNK)])
    return _pack(idx.to(torch.int64), bits)


def _pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    n = idx.numel()
    shifts = torch.arange(bits, device=idx.device, dtype=torch.int64)
    stream = ((idx[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)  # [n*bits]
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    out = _bytes_of(stream)
    assert out.numel() == packed_nbytes(n, bits)
    return out


def unpack_indices(buf: torch.Tensor, n: int, bits: int) -> tuple[torch.Tensor, bool]:
    """Inverse of pack_indices: (int64 [n], padding_is_zero)."""
    assert buf.dtype == torch.uint8 and buf.numel() == packed_nbytes(n, bits)
    if n > CHUNK:
        step = CHUNK * bits // 8
        parts = [
            _unpack(buf[s * bits // 8 : s * bits // 8 + step] if s + CHUNK < n else buf[s * bits // 8 :], min(CHUNK, n - s), bits)
            for s in range(0, n, CHUNK)
        ]
        return torch.cat([p[0] for p in parts]), all(p[1] for p in parts)
    return _unpack(buf, n, bits)


def _bytes_of(stream: torch.Tensor) -> torch.Tensor:
    """Bits [8·n] (0/1, uint8), LSB first -> uint8 [n]."""
    weights = (1 << torch.arange(8, device=stream.device, dtype=torch.int64)).to(torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int64).to(torch.uint8)


def _bits_of(buf: torch.Tensor) -> torch.Tensor:
    """uint8 [n] -> bits [8·n] (0/1, uint8), LSB first."""
    shifts = torch.arange(8, device=buf.device, dtype=torch.uint8)
    return ((buf[:, None] >> shifts) & 1).reshape(-1)


def _unpack(buf: torch.Tensor, n: int, bits: int) -> tuple[torch.Tensor, bool]:
    stream = _bits_of(buf)  # [8*nbytes]
    pad_ok = bool((stream[n * bits :] == 0).all())
    weights = 1 << torch.arange(bits, device=buf.device, dtype=torch.int64)
    idx = (stream[: n * bits].reshape(n, bits).to(torch.int64) * weights).sum(dim=1)
    return idx, pad_ok


# ---------------------------------------------------------------- split layout (indices held in memory)
#
# The file's bit stream is compact but slow to read back with torch ops (a gather per byte an
# index spans). A cache that reads its indices at every decode step holds them split instead:
# the low 8 bits as one byte per index (indices of b > 8 bits), the rest in w-bit fields
# (w = 1, 2, 4 or 8: b - 8, or b itself when b <= 8, rounded up to a power of two) packed LSB
# first into the bytes of each row of K indices. Reading back is a shift, a mask and a
# multiply-add over bytes: ~0.06 ms for 49k 10-bit indices on one CPU core, against ~0.48 ms
# for the stream (docs/generate.md, "Bytes").


def split_fields(bits: int) -> tuple[int, int]:
    """(low bytes: 1 if bits > 8 else 0, w: bits per high field) of the split layout, bits <= 16."""
    assert 1 <= bits <= 16, bits
    low = 1 if bits > 8 else 0
    return low, 1 << (bits - 8 * low - 1).bit_length()


def split_bits(bits: int) -> int:
    """Bits the split layout spends on one index (rows padded to whole bytes not counted)."""
    low, w = split_fields(bits)
    return 8 * low + w


def pack_split(idx: torch.Tensor, bits: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Indices [..., K] (non-negative, < 2**bits) -> (low bytes uint8 [..., K] or None, high fields uint8 [..., ceil(K·w/8)])."""
    low, w = split_fields(bits)
    x = idx.to(torch.int32)
    lo = (x & 255).to(torch.uint8) if low else None
    h = x >> 8 if low else x
    per = 8 // w
    pad = (-x.shape[-1]) % per
    if pad:
        h = torch.cat([h, h.new_zeros(*h.shape[:-1], pad)], -1)
    shifts = torch.arange(0, 8, w, device=x.device, dtype=torch.int32)
    hi = (h.view(*h.shape[:-1], -1, per) << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)
    return lo, hi


def unpack_split(lo: torch.Tensor | None, hi: torch.Tensor, k: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of pack_split: indices [..., K] in `dtype` (an integer type that holds 2**bits - 1)."""
    low, w = split_fields(bits)
    shifts = torch.arange(0, min(8, k * w), w, device=hi.device, dtype=torch.uint8)  # k fields in one byte: only theirs
    h = (hi[..., None] >> shifts).bitwise_and_((1 << w) - 1).flatten(-2)
    if h.shape[-1] != k:
        h = h[..., :k]
    if lo is None:
        return h.to(dtype)
    return lo.to(dtype).add_(h, alpha=256)


def quantize(coef: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantise coef [G, M, K] (float) to storage format; returns (q, g [G] f32, v [G, M] f16 or None)."""
    assert fmt in COEF_FORMATS, fmt
    c = coef.to(torch.float32)
    absmax = c.abs().amax(dim=(1, 2)) if c.numel() else c.new_zeros(c.shape[0])  # [G]
    if fmt == "fp16":
        g = torch.where(absmax > FP16_LIMIT, absmax / FP16_LIMIT, torch.ones_like(absmax))
        q = (c / g[:, None, None]).to(torch.float16)
        return q, g, None
    if fmt == "fp8":
        g = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
        q = (c / g[:, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return q, g, None
    if fmt in NARROW_LEVELS:
        return _quantize_narrow(c, absmax, NARROW_LEVELS[fmt])
    g = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    vmax = c.abs().amax(dim=2) if c.shape[2] else c.new_zeros(c.shape[:2])  # [G, M]
    v = (vmax / (INT8_MAX * g[:, None])).to(torch.float16)
    denom = v.to(torch.float32) * g[:, None]  # [G, M]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    q = torch.round(c / safe[:, :, None]).clamp(-INT8_MAX, INT8_MAX)
    q = torch.where(denom[:, :, None] > 0, q, torch.zeros_like(q)).to(torch.int8)
    return q, g, v


def _quantize_narrow(c: torch.Tensor, absmax: torch.Tensor, lim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integers in [-lim, lim] times one fp8 scale per vector (rounded up, so the largest never clips) times g.

    g is a power of two: codes re-quantised under another group's g (a live cache's blocks joined into one
    file section) then keep their vector scales exactly, within fp8's normal range."""
    g = torch.where(absmax > 0, torch.exp2(torch.ceil(torch.log2(absmax / (lim * FP8_MAX)))), torch.ones_like(absmax))
    vmax = c.abs().amax(dim=2) if c.shape[2] else c.new_zeros(c.shape[:2])  # [G, M]
    want = (vmax / (lim * g[:, None])).clamp(max=FP8_MAX)
    near = want.to(torch.float8_e4m3fn).to(torch.float32)
    up = (want * (1 + 2**-4)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    vf = torch.where(near < want, up, near)
    denom = vf * g[:, None]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    q = torch.round(c / safe[:, :, None]).clamp(-lim, lim)
    q = torch.where(denom[:, :, None] > 0, q, torch.zeros_like(q)).to(torch.int8)
    return q, g, vf.to(torch.float8_e4m3fn)


def dequantize(q: torch.Tensor, g: torch.Tensor, v: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """float32 [G, M, K] coefficients from storage (docs/format.md §3.2)."""
    assert fmt in COEF_FORMATS, fmt
    c = q.to(torch.float32)
    if fmt == "int8" or fmt in NARROW_LEVELS:
        assert v is not None
        c = c * v.to(torch.float32)[:, :, None]
    return c * g.to(torch.float32)[:, None, None]


def pack_narrow(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] as `bits`-bit two's-complement fields, LSB-first
    like pack_indices: zero is all bits clear."""
    return pack_indices(q.reshape(-1).to(torch.int64) & ((1 << bits) - 1), bits)


def unpack_narrow(buf: torch.Tensor, n: int, bits: int) -> tuple[torch.Tensor, bool]:
    """Inverse of pack_narrow: (int8 [n], ok); ok is False for nonzero padding or a field at -2^(bits-1),
    which pack_narrow never writes."""
    fields, pad_ok = unpack_indices(buf, n, bits)
    ok = pad_ok and not bool((fields == 1 << (bits - 1)).any())
    return signed_fields(fields, bits).to(torch.int8), ok


def signed_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """`bits`-bit two's-complement fields (non-negative integers < 2^bits) as the signed integers they hold."""
    half = 1 << (bits - 1)
    return torch.where(fields >= half, fields - 2 * half, fields)


def to_bytes_view(q: torch.Tensor) -> torch.Tensor:
    """Storage elements as a flat uint8 tensor (little-endian machines)."""
    return q.contiguous().reshape(-1).view(torch.uint8)


def from_bytes_view(buf: torch.Tensor, fmt_or_dtype: str | torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of to_bytes_view for a coefficient format name or a torch dtype."""
    dtype = _STORE_DTYPE[fmt_or_dtype] if isinstance(fmt_or_dtype, str) else fmt_or_dtype
    return buf.clone().view(dtype).reshape(shape)  # clone: byte offsets need not be aligned


# ---------------------------------------------------------------- fields of varying width (set-coded indices)


def pack_fields(values: torch.Tensor, widths: torch.Tensor, nbits: int) -> torch.Tensor:
    """Non-negative values [F] in fields of widths [F] (0..63 bits each, value < 2**width), one after another
    LSB first like pack_indices, then zero bits up to `nbits` (>= their sum): uint8 [ceil(nbits / 8)]."""
    values, widths = values.reshape(-1).to(torch.int64), widths.reshape(-1).to(torch.int64)
    total = int(widths.sum())
    assert total <= nbits, (total, nbits)
    stream = torch.zeros(packed_nbytes(nbits, 1) * 8, dtype=torch.uint8, device=values.device)
    starts = widths.cumsum(0) - widths
    step = CHUNK // 64
    for s in range(0, values.numel(), step):
        v, w, p = values[s : s + step], widths[s : s + step], starts[s : s + step]
        j = torch.arange(int(w.max()) if w.numel() else 0, device=values.device, dtype=torch.int64)
        mask = j[None, :] < w[:, None]
        stream[(p[:, None] + j)[mask]] = ((v[:, None] >> j) & 1)[mask].to(torch.uint8)
    return _bytes_of(stream)


def unpack_fields(buf: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Inverse of pack_fields: (values int64 [F], every bit after the fields is zero)."""
    widths = widths.reshape(-1).to(torch.int64)
    stream = _bits_of(buf).to(torch.int64)
    total = int(widths.sum())
    if total > stream.numel():
        return torch.zeros_like(widths), False
    starts = widths.cumsum(0) - widths
    out = torch.zeros_like(widths)
    step = CHUNK // 64
    for s in range(0, widths.numel(), step):
        w, p = widths[s : s + step], starts[s : s + step]
        j = torch.arange(int(w.max()) if w.numel() else 0, device=buf.device, dtype=torch.int64)
        mask = j[None, :] < w[:, None]
        bits = torch.where(mask, stream[(p[:, None] + j).clamp_max(max(stream.numel() - 1, 0))], 0)
        out[s : s + step] = (bits << j).sum(1)
    return out, bool((stream[total:] == 0).all())
