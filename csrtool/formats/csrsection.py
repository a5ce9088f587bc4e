"""The bytes of one `.csr` layer section (docs/format.md §3): codes in, bytes out, and back.

    section_nbytes(shape, N, C, S, coef, window, dtype, sink) -> bytes of a section of shape [B, H, T, D]
    section_bytes(codes, N) -> bytes                  codec.SectionCodes -> group scales, vector scales,
                                                      packed indices, coefficients, verbatim tokens
    parse_section(buf, shape, N, C, S, coef, window, dtype, sink) -> codec.SectionCodes

The codec (csrtool/codec.py) makes and consumes the tensors; this module owns their
byte layout. parse_section rejects what a valid writer never produces (an index >= N,
nonzero padding, an int8 coefficient of -128).
"""

from __future__ import annotations

import torch

from csrtool.codec import SectionCodes, spans
from csrtool.engine import packing
from csrtool.errors import CsrError


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def section_nbytes(
    shape: tuple[int, ...], n_atoms: int, chunks: int, sparsity: int, coef: str, window: int, dtype: torch.dtype, sink: int = 0
) -> int:
    """Bytes of one section (docs/format.md §3) for a tensor of shape [B, H, T, D]."""
    b, h, t, d = shape
    s, tc, w = spans(t, window, sink)
    m = b * h * tc
    n = m * chunks * sparsity
    coef_bytes = n * packing.COEF_BITS[coef] // 8
    vscale = 2 * m if coef == "int8" else 0
    return 4 * b * h + vscale + packing.packed_nbytes(n, packing.index_bits(n_atoms)) + coef_bytes + b * h * (s + w) * d * _elem(dtype)


def section_bytes(codes: SectionCodes, n_atoms: int) -> bytes:
    """The section's bytes, parts in the order of docs/format.md §3, no padding between them."""
    parts = [codes.g.to(torch.float32).numpy().tobytes()]
    if codes.v is not None:
        parts.append(codes.v.to(torch.float16).numpy().tobytes())
    parts.append(packing.pack_indices(codes.idx.reshape(-1), packing.index_bits(n_atoms)).numpy().tobytes())
    parts.append(packing.to_bytes_view(codes.q).numpy().tobytes())
    parts.append(codes.verbatim.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def parse_section(
    buf: bytes | memoryview, shape: tuple[int, ...], n_atoms: int, chunks: int, sparsity: int, coef: str, window: int,
    dtype: torch.dtype, sink: int = 0,
) -> SectionCodes:
    """Section bytes -> SectionCodes (idx [B, H, Tc, C, S], verbatim [B, H, s + w, D]: sink then tail)."""
    b, h, t, d = shape
    s, tc, w = spans(t, window, sink)
    m = b * h * tc
    n = m * chunks * sparsity
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else torch.zeros(0, dtype=torch.uint8)
    pos = 0

    def take(nbytes: int) -> torch.Tensor:
        nonlocal pos
        out = raw[pos : pos + nbytes]
        pos += nbytes
        return out

    g = packing.from_bytes_view(take(4 * b * h), torch.float32, (b * h,))
    v = packing.from_bytes_view(take(2 * m), torch.float16, (b * h, tc)) if coef == "int8" else None
    bits = packing.index_bits(n_atoms)
    idx, pad_ok = packing.unpack_indices(take(packing.packed_nbytes(n, bits)), n, bits)
    q = packing.from_bytes_view(take(n * packing.COEF_BITS[coef] // 8), coef, (b * h, tc, chunks * sparsity))
    verbatim = packing.from_bytes_view(take(b * h * (s + w) * d * _elem(dtype)), dtype, (b, h, s + w, d))
    assert pos == len(buf), (pos, len(buf))
    if not pad_ok or (n and int(idx.max()) >= n_atoms):
        raise CsrError("corrupted codes (atom index out of range)")
    if coef == "int8" and bool((q == -128).any()):
        raise CsrError("corrupted codes (int8 coefficient -128)")
    return SectionCodes(idx.reshape(b, h, tc, chunks, sparsity), q, g, v, verbatim)
