"""Bit-packing of indices and coefficient quantisation (docs/format.md §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csrtool.engine import packing


def test_index_bits():
    assert [packing.index_bits(n) for n in (2, 3, 4, 64, 1000, 1024, 1025, 4096)] == [1, 2, 2, 6, 10, 10, 11, 12]


def test_pack_known_bytes():
    # format.md §3.1 example: LSB-first, 12 bits each.
    buf = packing.pack_indices(torch.tensor([0x123, 0xABC]), 12)
    assert bytes(buf.tolist()) == bytes([0x23, 0xC1, 0xAB])
    # 3 bits: 5, 1, 7 -> bits 101 100 111 (LSB first) -> 0b11_001_101 = 0xCD, then 0b1 padded = 0x01
    assert bytes(packing.pack_indices(torch.tensor([5, 1, 7]), 3).tolist()) == bytes([0xCD, 0x01])


def test_matches_numpy_packbits():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << 12, size=1001)
    bits = ((x[:, None] >> np.arange(12)) & 1).astype(np.uint8).reshape(-1)
    want = np.packbits(bits, bitorder="little")
    assert bytes(packing.pack_indices(torch.from_numpy(x), 12).tolist()) == want.tobytes()


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 24), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_roundtrip(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1 << bits, (n,), generator=g)
    buf = packing.pack_indices(x, bits)
    assert buf.dtype == torch.uint8 and buf.numel() == (n * bits + 7) // 8
    y, pad_ok = packing.unpack_indices(buf, n, bits)
    assert pad_ok and torch.equal(x, y)


def test_pack_roundtrip_across_chunks():
    n = 2 * packing.CHUNK + 13
    x = torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(1))
    buf = packing.pack_indices(x, 12)
    y, pad_ok = packing.unpack_indices(buf, n, 12)
    assert pad_ok and torch.equal(x, y)


def test_nonzero_padding_is_flagged():
    buf = packing.pack_indices(torch.tensor([5, 1, 7]), 3)
    buf[-1] |= 0x80
    _, pad_ok = packing.unpack_indices(buf, 3, 3)
    assert not pad_ok


def _coefs(seed=0, decades=6):
    g = torch.Generator().manual_seed(seed)
    # 3 groups, 50 vectors, 6 coefficients; vector magnitudes over `decades` decades and a zero vector
    c = torch.randn(3, 50, 6, generator=g) * torch.logspace(4 - decades, 4, 50)[None, :, None]
    c[1, 7] = 0
    return c


@pytest.mark.parametrize("fmt,tol", [("fp16", 1e-3), ("fp8", 0.07), ("int8", 0.02)])
def test_quantize_error_bounded_and_finite(fmt, tol):
    # fp8 shares one scale per (batch, head) group: ~5 decades of dynamic range (format.md §3.2)
    c = _coefs(decades=4 if fmt == "fp8" else 6)
    q, g, v = packing.quantize(c, fmt)
    d = packing.dequantize(q, g, v, fmt)
    assert torch.isfinite(d).all()
    assert torch.equal(d[1, 7], torch.zeros(6))
    # relative error per vector stays small even for 1e4-sized values (no saturation)
    rel = (d - c).norm(dim=2) / c.norm(dim=2).clamp_min(1e-30)
    assert rel.max() < tol, rel.max()


@pytest.mark.parametrize("fmt", ["fp16", "fp8"])
def test_stored_values_roundtrip_exactly(fmt):
    """Quantising dequantised values reproduces the stored elements bit for bit."""
    q, g, v = packing.quantize(_coefs(1), fmt)
    d = packing.dequantize(q, g, v, fmt)
    q2, g2, v2 = packing.quantize(d, fmt)
    assert torch.equal(packing.to_bytes_view(q), packing.to_bytes_view(q2))
    assert torch.equal(g, g2)


def test_int8_range():
    q, g, v = packing.quantize(_coefs(3), "int8")
    assert q.dtype == torch.int8 and q.abs().max() == 127 and int(q.min()) >= -127
    assert v.dtype == torch.float16 and float(v.max()) <= 1.0


def test_narrow_quantize_by_hand():
    # int3: absmax 5.25 -> g = 5.25 / (3 * 448) = 1/256, the vector's scale 448 (exact in fp8), one level 448/256 = 1.75,
    # so q = round(c / 1.75) = round(3, -1.5, 0.75) = 3, -2 (half to even), 1
    q, g, v = packing.quantize(torch.tensor([[[5.25, -2.625, 1.3125], [0.0, 0.0, 0.0]]]), "int3")
    assert q.dtype == torch.int8 and q.tolist() == [[[3, -2, 1], [0, 0, 0]]]
    assert g.tolist() == [1 / 256] and v.dtype == torch.float8_e4m3fn and v.float().tolist() == [[448.0, 0.0]]
    assert packing.dequantize(q, g, v, "int3").tolist() == [[[5.25, -3.5, 1.75], [0.0, 0.0, 0.0]]]


@pytest.mark.parametrize("fmt", ["int4", "int3"])
def test_narrow_quantize_error_and_range(fmt):
    c = _coefs(5, decades=2)  # vectors within fp8's normal range of their group's largest (far smaller ones flush to zero)
    q, g, v = packing.quantize(c, fmt)
    lim = packing.NARROW_LEVELS[fmt]
    assert int(q.abs().max()) == lim and v.dtype == torch.float8_e4m3fn
    step = v.float() * g[:, None]  # [G, M]: one level of each vector
    assert (step[:, :, None] * lim >= c.abs().amax(dim=2, keepdim=True) * (1 - 1e-6)).all()  # the scale never clips
    err = (packing.dequantize(q, g, v, fmt) - c).abs()
    assert (err <= step[:, :, None] / 2 * (1 + 1e-5)).all()


def test_narrow_fields_known_bytes():
    # int3 two's complement: -3, 3, 0, -1 -> fields 101 011 000 111, LSB first -> 0x1D, 0x0E
    buf = packing.pack_narrow(torch.tensor([-3, 3, 0, -1]), 3)
    assert bytes(buf.tolist()) == bytes([0x1D, 0x0E])
    back, ok = packing.unpack_narrow(buf, 4, 3)
    assert ok and back.tolist() == [-3, 3, 0, -1]
    assert not packing.unpack_narrow(torch.tensor([0x04, 0x00], dtype=torch.uint8), 4, 3)[1]  # -4: never written
    assert not packing.unpack_narrow(torch.tensor([0x00, 0x10], dtype=torch.uint8), 4, 3)[1]  # nonzero padding


@pytest.mark.parametrize("fmt", ("fp16", "fp8", "int8"))  # whole-byte formats; int4/int3: test_csrfile's bit streams
def test_bytes_view_roundtrip(fmt):
    q, _, _ = packing.quantize(_coefs(2), fmt)
    raw = packing.to_bytes_view(q)
    assert raw.numel() == q.numel() * packing.COEF_BITS[fmt] // 8
    back = packing.from_bytes_view(raw, fmt, tuple(q.shape))
    assert torch.equal(packing.to_bytes_view(back), raw)


def test_fp8_group_scale_uses_full_range():
    c = torch.tensor([[[1000.0, -3.0, 0.5]]])
    q, g, _ = packing.quantize(c, "fp8")
    assert g.item() == pytest.approx(1000.0 / 448)
    assert q.float().abs().max().item() == 448.0


@pytest.mark.parametrize("bits", range(1, 17))
def test_split_layout_roundtrip(bits):
    """pack_split/unpack_split: every index value back, for rows of K indices whose high fields fill part of a byte or several."""
    g = torch.Generator().manual_seed(bits)
    dtype = torch.uint8 if bits <= 8 else torch.int32
    for k in (1, 2, 3, 4, 5, 8, 12):
        idx = torch.randint(0, 1 << bits, (2, 3, 7, k), generator=g)
        idx[0, 0, 0] = (1 << bits) - 1  # the largest index
        lo, hi = packing.pack_split(idx, bits)
        low, w = packing.split_fields(bits)
        assert (lo is None) == (bits <= 8) and hi.shape == (2, 3, 7, -(-k * w // 8)) and hi.dtype == torch.uint8
        out = packing.unpack_split(lo, hi, k, bits, dtype)
        assert out.dtype == dtype and torch.equal(out.long(), idx)
    assert packing.split_bits(bits) == 8 * low + w and w in (1, 2, 4, 8) and 8 * low + w >= bits
