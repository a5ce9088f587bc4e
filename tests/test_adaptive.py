"""Adaptive sparsity: per-vector atom counts at the bits of S fixed atoms, in the codec, the .csr file and eval."""

from __future__ import annotations

import json

import math
import struct

import pytest
import torch

from csrtool import budget, codec
from csrtool.engine import adaptive, packing, pursuit
from csrtool.errors import CsrError
from csrtool.formats import csrfile, csrsection
from csrtool.formats.dicts import load_dicts

from test_csrfile import D, INV_FREQ, N, T, make_cache, make_dicts, write


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def mixed_vectors(m: int, d: int, atoms: torch.Tensor, seed: int) -> torch.Tensor:
    """Half the vectors are 2 atoms plus a little noise (easy), half are dense noise (hard)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(atoms.shape[0], (m // 2, 2), generator=g)
    easy = (torch.randn(m // 2, 2, 1, generator=g) * atoms[pick]).sum(1) + 0.01 * torch.randn(m // 2, d, generator=g)
    hard = torch.randn(m - m // 2, d, generator=g)
    return torch.cat([easy, hard])


# ---------------------------------------------------------------- engine


def test_choose_counts_fits_the_total_and_feeds_the_worst_fits():
    gains = torch.tensor([[9.0, 0.1, 0.1, 0.1], [5.0, 4.0, 3.0, 2.0], [1.0, 0.5, 0.0, 0.0]])
    counts = adaptive.choose_counts(gains, 6)
    assert int(counts.sum()) <= 6
    assert counts.tolist() == [1, 4, 1]  # the vector whose atoms keep paying gets them
    assert adaptive.choose_counts(gains, 12).tolist() == [4, 4, 2]  # room for everything: every atom that removes energy
    assert adaptive.choose_counts(gains, 0).tolist() == [0, 0, 0]


def test_slots_pay_for_the_counts_exactly():
    for m, s, ab, smax in ((1, 4, 20, 8), (3, 2, 20, 4), (1000, 4, 20, 8), (77, 8, 28, 16)):
        k = adaptive.slots(m, s, ab, smax)
        assert k * ab + m * adaptive.count_bits(smax) <= m * s * ab  # never more bits than S fixed atoms
        assert (k + 1) * ab + m * adaptive.count_bits(smax) > m * s * ab  # and the largest such count
    assert adaptive.count_bits(8) == 4 and adaptive.count_bits(4) == 3 and adaptive.count_bits(2) == 2


@pytest.mark.parametrize("method", ["omp", "mp"])
def test_a_prefix_of_an_adaptive_code_is_the_fixed_code_with_that_many_atoms(method):
    atoms = unit(128, 16, 0)
    x = mixed_vectors(200, 16, atoms, 1)[None]
    idx, coef, counts = pursuit.encode_groups_adaptive(x, atoms[None], 8, 3 * 200, method)
    assert int(counts.sum()) <= 600 and int(counts.max()) <= 8
    got = pursuit.decode_groups(idx, coef, atoms[None])[0]
    for k in range(0, 9):
        rows = (counts[0] == k).nonzero()[:, 0]
        if not rows.numel():
            continue
        if k == 0:
            assert torch.equal(got[rows], torch.zeros_like(got[rows]))
            continue
        i, c = pursuit.encode(x[0, rows], atoms, k, method)
        torch.testing.assert_close(got[rows], pursuit.decode(i, c, atoms), atol=1e-5, rtol=1e-5)
    past = torch.arange(8)[None, None, :] >= counts[..., None]
    assert bool((coef[past] == 0).all()) and bool((idx[past] == 0).all())
    assert not bool(torch.signbit(coef[past]).any())  # +0, so files are canonical


# ---------------------------------------------------------------- codec


def test_adaptive_codes_beat_fixed_ones_at_no_more_bits():
    atoms = unit(256, 32, 2)
    x = mixed_vectors(300, 32, atoms, 3).reshape(1, 3, 100, 32)
    a = atoms[None, None]
    for s in (2, 4):
        fixed = codec.roundtrip(x, a, s, "fp16", "omp")
        adapt = codec.roundtrip(x, a, s, "fp16", "omp", adaptive=True)
        err_f, err_a = float((x - fixed).pow(2).sum()), float((x - adapt).pow(2).sum())
        assert err_a < 0.9 * err_f, (s, err_a, err_f)
        _, _, counts = codec.encode_counted(x, a, s, "omp", True, "fp16")
        atom_bits = packing.index_bits(256) + 16
        bits = int(counts.sum()) * atom_bits + counts.numel() * codec.count_bits(s, 32, 256)
        assert bits <= counts.numel() * s * atom_bits
    # at S = 1 the count would cost a tenth of the atoms: such sides stay fixed
    assert torch.equal(codec.roundtrip(x, a, 1, "fp8", "omp", adaptive=True), codec.roundtrip(x, a, 1, "fp8", "omp"))


def test_values_spend_atoms_by_relative_error_keys_by_absolute_error():
    """Same-shaped vectors at two scales: keys (absolute error) give the large ones the atoms, values
    (error relative to each vector) give both scales about the same counts."""
    atoms = unit(256, 32, 4)
    x = torch.randn(1, 1, 200, 32, generator=torch.Generator().manual_seed(5))
    x[:, :, :100] *= 0.05
    a = atoms[None, None]
    _, _, ck = codec.encode_counted(x, a, 4, "omp", True, "fp8", "k")
    _, _, cv = codec.encode_counted(x, a, 4, "omp", True, "fp8", "v")
    small_k, large_k = ck[0, 0, :100].float().mean(), ck[0, 0, 100:].float().mean()
    small_v, large_v = cv[0, 0, :100].float().mean(), cv[0, 0, 100:].float().mean()
    assert small_k < 1.0 and large_k > 6.0
    assert abs(float(small_v - large_v)) < 1.0
    assert int(ck.sum()) == int(cv.sum()) == codec.adaptive_slots(200, 4, 32, 256, "fp8")


# ---------------------------------------------------------------- the .csr file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("adaptive")
    dicts_path = make_dicts(d / "dicts.safetensors")
    cache = make_cache()
    out = {}
    for name, ad in (("fixed", False), ("adaptive", True)):
        cfg = codec.CodecConfig(3, 2, "fp8", "omp", window=2, sink=5, adaptive=ad)
        out[name] = (d / f"{name}.csr", write(d / f"{name}.csr", cache, dicts_path, cfg), cfg)
    return {"dicts": load_dicts(dicts_path), "cache": cache, **out}


def test_adaptive_file_round_trips_to_the_in_memory_codec(files):
    path, size, cfg = files["adaptive"]
    cache, ds = files["cache"], files["dicts"]
    reader = csrfile.open_csr(path)
    assert reader.header.version == 4 and reader.header.config.adaptive
    # the counts are paid for: the payload is never larger than the fixed file's (the header says "adaptive")
    assert reader.header.payload_nbytes <= csrfile.open_csr(files["fixed"][0]).header.payload_nbytes
    dec = csrfile.read_csr(path, ds)
    s, end = cfg.sink, T - cfg.window
    for layer in range(len(cache.keys)):
        k, v = cache.keys[layer], cache.values[layer]
        want_k = codec.roundtrip_keys(k[:, :, s:end], ds.get(layer, "k"), 3, "fp8", "omp", 3 + s, cache.meta["rope"], adaptive=True)
        assert torch.equal(dec.keys[layer][:, :, s:end], want_k)
        assert torch.equal(dec.values[layer][:, :, s:end], codec.roundtrip(v[:, :, s:end], ds.get(layer, "v"), 2, "fp8", "omp", adaptive=True, kind="v"))
        assert torch.equal(dec.keys[layer][:, :, :s], k[:, :, :s]) and torch.equal(dec.values[layer][:, :, end:], v[:, :, end:])


def test_adaptive_file_is_deterministic(files, tmp_path):
    path, _, cfg = files["adaptive"]
    ds_path = make_dicts(tmp_path / "d.safetensors")
    write(tmp_path / "again.csr", files["cache"], ds_path, cfg)
    assert (tmp_path / "again.csr").read_bytes() == path.read_bytes()


def _section(seed: int = 0):
    """An adaptive section whose last vector gives up its last atom, so the last stored slot is unused."""
    atoms = unit(2 * N, D, seed).reshape(2, 1, N, D)
    x = torch.randn(1, 2, 12, D, generator=torch.Generator().manual_seed(seed))
    sec = codec.encode_section(x, torch.zeros(1, 2, 3, D), atoms, 3, "fp8", "omp", None, True)
    k = int(sec.counts[0, 1, 11, 0])
    sec.counts[0, 1, 11, 0] = k - 1
    sec.idx[0, 1, 11, 0, k - 1] = 0
    sec.q.view(torch.uint8)[1, 11, k - 1] = 0
    return bytearray(csrsection.section_bytes(sec, N, 3, "fp8")), sec


def _parse(buf: bytes):
    return csrsection.parse_section(bytes(buf), (1, 2, 15, D), N, 1, 3, "fp8", 1, torch.float32, 2, True)


def test_adaptive_section_parses_back_and_rejects_bad_counts_and_dirty_slots():
    buf, sec = _section()
    back = _parse(buf)
    assert torch.equal(back.idx, sec.idx) and torch.equal(back.counts, sec.counts)
    m, smax = 2 * 12, codec.adaptive_max(3, D, N)
    cbits, start = codec.count_bits(3, D, N), 4 * 2
    # a count above S_max
    bad = bytearray(buf)
    bad[start : start + packing.packed_nbytes(m, cbits)] = packing.pack_indices(torch.full((m,), smax + 1), cbits).numpy().tobytes()
    with pytest.raises(CsrError, match="atom count out of range"):
        _parse(bad)
    # counts that sum past the section's slots
    bad[start : start + packing.packed_nbytes(m, cbits)] = packing.pack_indices(torch.full((m,), smax), cbits).numpy().tobytes()
    with pytest.raises(CsrError, match="atom count out of range"):
        _parse(bad)
    # a nonzero coefficient in an unused slot (the last one)
    assert int(sec.counts.sum()) < codec.adaptive_slots(m, 3, D, N, "fp8")
    coef_end = len(buf) - 3 * 2 * D * 4
    bad = bytearray(buf)
    bad[coef_end - 1] = 0x38  # fp8 1.0
    with pytest.raises(CsrError, match="unused atom slots"):
        _parse(bad)


@pytest.mark.parametrize("coef", ["fp8", "fp16", "int8", "int4", "int3"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_adaptive_sections_round_trip_in_every_coefficient_format(coef, chunks):
    """Bytes -> codes -> bytes for each coefficient format and value split; the size is the one the header implies
    and never more than the fixed section's."""
    d = D if coef not in budget.NARROW_MOST else 48 * chunks  # int4/int3 code chunks of at least 8·S / 16·S channels
    atoms = unit(2 * chunks * N, d // chunks, 6).reshape(2, chunks, N, d // chunks)
    x = torch.randn(1, 2, 20, d, generator=torch.Generator().manual_seed(7))
    tail = torch.randn(1, 2, 5, d, generator=torch.Generator().manual_seed(8)).half()
    assert codec.section_format(coef, "v", 3, d // chunks) == coef
    sec = codec.encode_section(x, tail, atoms, 3, coef, "omp", None, True, "v")
    buf = csrsection.section_bytes(sec, N, 3, coef)
    shape = (1, 2, 25, d)
    assert len(buf) == csrsection.section_nbytes(shape, N, chunks, 3, coef, 1, torch.float16, 4, True)
    assert len(buf) <= csrsection.section_nbytes(shape, N, chunks, 3, coef, 1, torch.float16, 4, False)
    back = csrsection.parse_section(buf, shape, N, chunks, 3, coef, 1, torch.float16, 4, True)
    assert torch.equal(back.idx, sec.idx) and torch.equal(back.counts, sec.counts) and torch.equal(back.verbatim, sec.verbatim)
    assert csrsection.section_bytes(back, N, 3, coef) == buf
    got = codec.decode_section(back, atoms, coef)
    assert torch.equal(got, codec.decode_section(sec, atoms, coef))


def test_adaptive_header_fields_are_validated(files):
    from csrtool.formats.csrheader import header_from_json

    obj = csrfile.open_csr(files["adaptive"][0]).header.to_json()
    assert obj["version"] == 4 and obj["codec"]["adaptive"] is True
    with pytest.raises(CsrError, match="codec.adaptive must be true in a version 4 header"):
        header_from_json({**obj, "codec": {**obj["codec"], "adaptive": 1}})
    with pytest.raises(CsrError, match="codec.adaptive is only allowed in a version 4 or 5 header"):
        header_from_json({**obj, "version": 1})


def test_compress_cli_adaptive_inspect_and_decompress(files, tmp_path):
    from typer.testing import CliRunner

    from csrtool.cli import app
    from csrtool.formats.kvcache import save_cache

    runner = CliRunner()
    cache_path = tmp_path / "c.pt"
    save_cache(cache_path, files["cache"])
    d = make_dicts(tmp_path / "d.safetensors")
    res = runner.invoke(app, ["compress", str(cache_path), "-d", str(d), "-o", str(tmp_path / "a.csr"), "--sparsity", "3,2"])  # adaptive is the default
    assert res.exit_code == 0, res.output
    assert "adaptive" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "a.csr")])
    assert res.exit_code == 0 and ".csr v5" in res.output and "adaptive counts" in res.output  # v5: the default fp8/int4 coefficients
    res = runner.invoke(app, ["inspect", str(tmp_path / "a.csr"), "--json"])
    want = [codec.section_format(codec.DEFAULT_COEF, "k", 3, D), codec.section_format(codec.DEFAULT_COEF, "v", 2, D // 2)]  # values in 2 chunks
    assert res.exit_code == 0 and json.loads(res.output)["section_coefs"] == [want] * len(files["cache"].keys)
    res = runner.invoke(app, ["decompress", str(tmp_path / "a.csr"), "-d", str(d), "-o", str(tmp_path / "r.pt")])
    assert res.exit_code == 0, res.output
