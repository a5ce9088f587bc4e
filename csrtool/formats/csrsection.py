"""The bytes of one `.csr` layer section (docs/format.md §3): codes in, bytes out, and back.

    section_nbytes(shape, N, C, S, coef, window, dtype, sink, adaptive) -> bytes of a section of shape [B, H, T, D]
    section_bytes(codes, N, S, coef) -> bytes              codec.SectionCodes -> group scales, vector scales,
                                                      [packed counts,] packed indices, coefficients, verbatim tokens
    parse_section(buf, shape, N, C, S, coef, window, dtype, sink, adaptive) -> codec.SectionCodes

The codec (csrtool/codec.py) makes and consumes the tensors; this module owns their
byte layout. `coef` here is the section's one format (codec.coef_side of the file's spec).
parse_section rejects what a valid writer never produces (an index >= N, nonzero padding,
an int8 coefficient of -128 (int4: -8, int3: -4), a negative int4/int3 vector scale,
adaptive counts above S_max or over the section's atom slots, nonzero unused slots).

Adaptive sections (docs/format.md §3.3) store each vector chunk's atom count and then
a fixed number of atom slots, codec.adaptive_slots(M·C, S, ...), filled in vector order
with each chunk's first `count` atoms and zero after: the size still follows from the
header alone. Set-coded adaptive sections (`sets`, version 6, §3.4) store the counts and then
one bit stream of codec.adaptive_bits(M·C, S, ...) bits: every used atom's coefficient, then
each chunk's indices as one sorted multiset (engine/setcode.py), zeros after.
"""

from __future__ import annotations

import torch

from csrtool import codec
from csrtool.codec import SectionCodes, spans
from csrtool.engine import packing, setcode
from csrtool.engine.adaptive import used_slots
from csrtool.errors import CsrError


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _vscale_bytes(m: int, coef: str) -> int:
    """Bytes of a section's M vector scales: float16 (int8), fp8 e4m3fn (int4, int3), none otherwise."""
    return m * packing.VECTOR_SCALE_BITS[coef] // 8


def _coef_bytes(n: int, coef: str) -> int:
    """Bytes of n coefficients: COEF_BITS each, whole bytes (fp16, fp8, int8) or one bit stream (int4, int3)."""
    return packing.packed_nbytes(n, packing.COEF_BITS[coef])


def _coef_part(q: torch.Tensor, narrow: str | None) -> bytes:
    """The stored coefficients' bytes: whole elements, or for `narrow` (int4, int3) one bit stream (§3.2)."""
    if narrow is None:
        return packing.to_bytes_view(q).numpy().tobytes()
    return packing.pack_narrow(q, packing.COEF_BITS[narrow]).numpy().tobytes()


def _read_coefs(buf: torch.Tensor, n: int, coef: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of _coef_part; CsrError for a narrow field at its most negative value or nonzero padding."""
    if coef not in packing.NARROW_LEVELS:
        return packing.from_bytes_view(buf, coef, shape)
    q, ok = packing.unpack_narrow(buf, n, packing.COEF_BITS[coef])
    if not ok:
        raise CsrError(f"corrupted codes ({coef} coefficient {-packing.NARROW_LEVELS[coef] - 1} or nonzero padding)")
    return q.reshape(shape)


def _layout(shape: tuple[int, ...], n_atoms: int, chunks: int, sparsity: int, coef: str, adaptive: bool, window: int, sink: int):
    """(m vectors, atom slots, count bits or 0, slots per chunk in memory) of a section."""
    b, h, t, d = shape
    _, tc, _ = spans(t, window, sink)
    m = b * h * tc
    if not codec.adaptive_for(adaptive, sparsity):
        return m, m * chunks * sparsity, 0, sparsity
    dc = d // chunks
    return m, codec.adaptive_slots(m * chunks, sparsity, dc, n_atoms, coef), codec.count_bits(sparsity, dc, n_atoms), codec.adaptive_max(sparsity, dc, n_atoms)


def section_nbytes(
    shape: tuple[int, ...], n_atoms: int, chunks: int, sparsity: int, coef: str, window: int, dtype: torch.dtype, sink: int = 0,
    adaptive: bool = False, sets: bool = False,
) -> int:
    """Bytes of one section (docs/format.md §3) for a tensor of shape [B, H, T, D]; `sets`: adaptive codes set-coded (§3.4)."""
    b, h, t, d = shape
    s, tc, w = spans(t, window, sink)
    m, n, cbits, _ = _layout(shape, n_atoms, chunks, sparsity, coef, adaptive, window, sink)
    vscale = _vscale_bytes(m, coef)
    counts = packing.packed_nbytes(m * chunks, cbits) if cbits else 0
    if cbits and sets:
        atoms = packing.packed_nbytes(codec.adaptive_bits(m * chunks, sparsity, d // chunks, n_atoms, coef), 1)
    else:
        atoms = packing.packed_nbytes(n, packing.index_bits(n_atoms)) + _coef_bytes(n, coef)
    return 4 * b * h + vscale + counts + atoms + b * h * (s + w) * d * _elem(dtype)


def _ints(q: torch.Tensor) -> torch.Tensor:
    """The coefficients' bits as an integer tensor of the same element size (for masking and scattering)."""
    return q.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[q.element_size()])


def section_bytes(codes: SectionCodes, n_atoms: int, sparsity: int | None = None, coef: str | None = None, sets: bool = False) -> bytes:
    """The section's bytes, parts in the order of docs/format.md §3, no padding between them.
    Adaptive codes (codes.counts) need the plan's `sparsity` and `coef` (the section's format), which fix
    the atom slots (`sets`: the bit stream, §3.4); int4/int3 codes need `coef` too."""
    parts = [codes.g.to(torch.float32).numpy().tobytes()]
    narrow = codes.v is not None and codes.v.dtype == torch.float8_e4m3fn
    if narrow and coef not in packing.NARROW_LEVELS:
        raise ValueError("int4/int3 codes need their coefficient format to be written")
    if codes.v is not None:
        parts.append(packing.to_bytes_view(codes.v).numpy().tobytes())
    idx, q = codes.idx.reshape(-1), codes.q
    if codes.counts is not None:
        if sparsity is None or coef is None:
            raise ValueError("adaptive codes need the plan's sparsity and coefficient format to size their atom slots")
        b, h, tc, c, smax = codes.idx.shape
        dc = codes.verbatim.shape[3] // c
        parts.append(packing.pack_indices(codes.counts.reshape(-1), codec.count_bits(sparsity, dc, n_atoms)).numpy().tobytes())
        if sets:
            parts.append(_set_stream(codes, n_atoms, sparsity, coef))
        else:
            slots = codec.adaptive_slots(b * h * tc * c, sparsity, dc, n_atoms, coef)
            used = used_slots(codes.counts, smax).reshape(-1)
            pad = slots - int(used.sum())
            assert pad >= 0, (int(used.sum()), slots)
            qi = _ints(codes.q).reshape(-1)
            idx, q = torch.cat([idx[used], idx.new_zeros(pad)]), torch.cat([qi[used], qi.new_zeros(pad)])
    if codes.counts is None or not sets:
        parts.append(packing.pack_indices(idx, packing.index_bits(n_atoms)).numpy().tobytes())
        parts.append(_coef_part(q, coef if narrow else None))
    parts.append(codes.verbatim.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def _coef_fields(q: torch.Tensor, coef: str) -> torch.Tensor:
    """Stored coefficients [n] as non-negative COEF_BITS[coef]-bit fields: their bit patterns (two's complement for integers)."""
    bits = packing.COEF_BITS[coef]
    ints = q.to(torch.int64) if coef in packing.NARROW_LEVELS else _ints(q.reshape(-1)).to(torch.int64)
    return ints.reshape(-1) & ((1 << bits) - 1)


def _coef_values(fields: torch.Tensor, coef: str) -> tuple[torch.Tensor, bool]:
    """Inverse of _coef_fields: (coefficients in their stored dtype [n], ok: no narrow field at its most negative value)."""
    bits = packing.COEF_BITS[coef]
    signed = packing.signed_fields(fields, bits)  # the same bits as a signed integer of that width
    if coef in packing.NARROW_LEVELS:
        return signed.to(torch.int8), not bool((fields == 1 << (bits - 1)).any())
    return signed.to({8: torch.int8, 16: torch.int16}[bits]).view(packing._STORE_DTYPE[coef]), True


def _set_stream(codes: SectionCodes, n_atoms: int, sparsity: int, coef: str) -> bytes:
    """A set-coded section's bit stream (§3.4): the used atoms' coefficients in slot order, then every chunk's set code."""
    b, h, tc, c, smax = codes.idx.shape
    dc = codes.verbatim.shape[3] // c
    counts = codes.counts.reshape(-1)
    idx, q = setcode.sort_codes(codes.idx.reshape(-1, smax), _ints(codes.q).reshape(-1, smax), counts)
    used = used_slots(counts, smax)
    bits = packing.index_bits(n_atoms)
    sv, sw = setcode.encode(idx, counts, bits)
    cv = _coef_fields(q[used].view(codes.q.dtype), coef)
    values = torch.cat([cv, sv])
    widths = torch.cat([torch.full_like(cv, packing.COEF_BITS[coef]), sw])
    total = codec.adaptive_bits(b * h * tc * c, sparsity, dc, n_atoms, coef)
    if int(widths.sum()) > total:
        raise ValueError(f"set codes of {int(widths.sum())} bits exceed the section's {total}: codes not made with sets=True")
    return packing.pack_fields(values, widths, total).numpy().tobytes()


def parse_section(
    buf: bytes | memoryview, shape: tuple[int, ...], n_atoms: int, chunks: int, sparsity: int, coef: str, window: int,
    dtype: torch.dtype, sink: int = 0, adaptive: bool = False, sets: bool = False,
) -> SectionCodes:
    """Section bytes -> SectionCodes (idx [B, H, Tc, C, S], verbatim [B, H, s + w, D]: sink then tail;
    adaptive: S = S_max slots per chunk, zero past each count, and counts [B, H, Tc, C]; `sets`: set-coded, §3.4)."""
    b, h, t, d = shape
    s, tc, w = spans(t, window, sink)
    m, n, cbits, smax = _layout(shape, n_atoms, chunks, sparsity, coef, adaptive, window, sink)
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else torch.zeros(0, dtype=torch.uint8)
    pos = 0

    def take(nbytes: int) -> torch.Tensor:
        nonlocal pos
        out = raw[pos : pos + nbytes]
        pos += nbytes
        return out

    g = packing.from_bytes_view(take(4 * b * h), torch.float32, (b * h,))
    v = None
    if coef in packing.VECTOR_SCALE_DTYPE:
        v = packing.from_bytes_view(take(_vscale_bytes(m, coef)), packing.VECTOR_SCALE_DTYPE[coef], (b * h, tc))
        if coef in packing.NARROW_LEVELS and bool((v.to(torch.float32) < 0).any()):
            raise CsrError(f"corrupted codes (negative {coef} vector scale)")
    counts = None
    if cbits:
        counts, cnt_ok = packing.unpack_indices(take(packing.packed_nbytes(m * chunks, cbits)), m * chunks, cbits)
        if not cnt_ok or (counts.numel() and (int(counts.max()) > smax or (not sets and int(counts.sum()) > n))):
            raise CsrError("corrupted codes (atom count out of range)")
    sets = bool(cbits) and sets
    if sets:
        nbits = codec.adaptive_bits(m * chunks, sparsity, d // chunks, n_atoms, coef)
        stream = take(packing.packed_nbytes(nbits, 1))
    else:
        bits = packing.index_bits(n_atoms)
        idx, pad_ok = packing.unpack_indices(take(packing.packed_nbytes(n, bits)), n, bits)
        q = _read_coefs(take(_coef_bytes(n, coef)), n, coef, (n,) if cbits else (b * h, tc, chunks * sparsity))
    verbatim = packing.from_bytes_view(take(b * h * (s + w) * d * _elem(dtype)), dtype, (b, h, s + w, d))
    assert pos == len(buf), (pos, len(buf))
    if sets:
        idx, q = _parse_sets(stream, nbits, counts, n_atoms, smax, sparsity, d // chunks, coef)
        return SectionCodes(idx.reshape(b, h, tc, chunks, smax), q.reshape(b * h, tc, chunks * smax), g, v, verbatim,
                            counts.reshape(b, h, tc, chunks))
    if not pad_ok or (n and int(idx.max()) >= n_atoms):
        raise CsrError("corrupted codes (atom index out of range)")
    if coef == "int8" and bool((q == -128).any()):
        raise CsrError("corrupted codes (int8 coefficient -128)")
    if counts is None:
        return SectionCodes(idx.reshape(b, h, tc, chunks, sparsity), q, g, v, verbatim)
    k = int(counts.sum())
    if bool(idx[k:].any()) or bool(_ints(q)[k:].any()):
        raise CsrError("corrupted codes (unused atom slots are not zero)")
    used = used_slots(counts, smax).reshape(-1)
    full_idx = idx.new_zeros(m * chunks * smax)
    full_idx[used] = idx[:k]
    full_q = _ints(q).new_zeros(m * chunks * smax)
    full_q[used] = _ints(q)[:k]
    return SectionCodes(
        full_idx.reshape(b, h, tc, chunks, smax), full_q.view(q.dtype).reshape(b * h, tc, chunks * smax), g, v, verbatim,
        counts.reshape(b, h, tc, chunks),
    )


def _parse_sets(stream: torch.Tensor, nbits: int, counts: torch.Tensor, n_atoms: int, smax: int, sparsity: int, dc: int,
                coef: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A set-coded bit stream -> idx [R, S_max] int64 and coefficients [R, S_max] (stored dtype), zero past each count.
    CsrError for what no valid writer makes: counts over the section's bits, a rank beyond its bound, an index >= N,
    indices not in ascending order, a narrow or int8 coefficient at its most negative value, nonzero padding."""
    bits = packing.index_bits(n_atoms)
    cost = codec.adaptive_cost(sparsity, dc, n_atoms, coef)
    if int(cost[counts].sum()) > nbits:
        raise CsrError("corrupted codes (atom counts over the section's bits)")
    k = int(counts.sum())
    widths = torch.cat([torch.full((k,), packing.COEF_BITS[coef], dtype=torch.int64), setcode.field_widths(counts, bits, smax)])
    values, pad_ok = packing.unpack_fields(stream, widths)
    if not pad_ok:
        raise CsrError("corrupted codes (nonzero padding after the set codes)")
    cf, cf_ok = _coef_values(values[:k], coef)
    if not cf_ok or (coef == "int8" and bool((cf == -128).any())):
        raise CsrError(f"corrupted codes ({coef} coefficient at its most negative value)")
    idx, ok = setcode.decode(values[k:], counts, bits, smax)
    used = used_slots(counts, smax)
    if not ok or bool((idx >= n_atoms).any()):
        raise CsrError("corrupted codes (atom index out of range)")
    if smax > 1 and bool(((idx[:, 1:] < idx[:, :-1]) & used[:, 1:]).any()):
        raise CsrError("corrupted codes (a vector's atom indices are not in ascending order)")
    q = _ints(cf).new_zeros(counts.numel(), smax)
    q[used] = _ints(cf)
    return idx, q.view(cf.dtype)
