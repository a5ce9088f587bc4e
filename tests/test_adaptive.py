"""Adaptive sparsity: per-vector atom counts at the bits of S fixed atoms, in the codec, the .csr file and eval."""

from __future__ import annotations

import json

import math
import struct

import pytest
import torch

from csrtool import budget, codec
from csrtool.engine import adaptive, packing, pursuit, setcode
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
        atom_bits = packing.index_bits(256) + 16
        budget = counts_bits = None
        for sets in (False, True):
            _, _, counts = codec.encode_counted(x, a, s, "omp", True, "fp16", "k", sets)
            counts_bits = counts.numel() * codec.count_bits(s, 32, 256)
            if sets:  # indices set-coded: each vector's k atoms cost setcode.set_bits(k, 8) + 16 k
                bits = sum(setcode.set_bits(int(k), 8) + 16 * int(k) for k in counts.reshape(-1)) + counts_bits
                assert int(counts.sum()) > budget, "set codes buy more atoms in the same bits"
            else:
                bits = int(counts.sum()) * atom_bits + counts_bits
                budget = int(counts.sum())
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
    cost = codec.adaptive_cost(4, 32, 256, "fp8")
    budget_bits = codec.adaptive_bits(200, 4, 32, 256, "fp8")
    for c in (ck, cv):  # set-coded: the budget in bits is spent to within one vector's extra atom
        assert budget_bits - int(cost[-1] - cost[-2]) < int(cost[c].sum()) <= budget_bits
    _, _, fixed = codec.encode_counted(x, a, 4, "omp", True, "fp8", "v", sets=False)
    assert int(fixed.sum()) == codec.adaptive_slots(200, 4, 32, 256, "fp8")


def test_the_codec_picks_atoms_with_fast_correlations(monkeypatch):
    """compress, eval and the live cache code through codec.encode_counted: with native bf16 they take the fast
    path (nearly the exact path's atoms, the same budget and error), and with codec.FAST off the exact one."""
    monkeypatch.setattr(pursuit, "_native_bf16_cpu", lambda: True)
    atoms = unit(1024, 64, 6)
    x = mixed_vectors(600, 64, atoms, 7).reshape(1, 3, 200, 64)
    a = atoms[None, None]
    assert codec.FAST
    calls: list = []
    real = pursuit._refine
    monkeypatch.setattr(pursuit, "_refine", lambda *args: calls.append(1) or real(*args))  # counts, still runs
    fast = codec.encode_counted(x, a, 6, "omp", True, "fp8", "k")
    assert calls  # the bf16 path
    monkeypatch.setattr(codec, "FAST", False)
    del calls[:]
    exact = codec.encode_counted(x, a, 6, "omp", True, "fp8", "k")
    assert not calls
    assert (fast[0] == exact[0]).all(-1).float().mean() > 0.9
    cost = codec.adaptive_cost(6, 64, 1024, "fp8")
    assert int(cost[fast[2]].sum()) <= codec.adaptive_bits(600, 6, 64, 1024, "fp8")
    err = [float((x - codec.decode_codes(i, c, a)).pow(2).sum() / x.pow(2).sum()) for i, c, _ in (fast, exact)]
    assert abs(err[0] - err[1]) <= 0.01 * err[1]


# ---------------------------------------------------------------- the .csr file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("adaptive")
    dicts_path = make_dicts(d / "dicts.safetensors")
    cache = make_cache()
    out = {}
    for name, ad, sets in (("fixed", False, True), ("adaptive", True, False), ("sets", True, True)):
        cfg = codec.CodecConfig(3, 2, "fp8", "omp", window=2, sink=5, adaptive=ad, set_indices=sets)
        out[name] = (d / f"{name}.csr", write(d / f"{name}.csr", cache, dicts_path, cfg), cfg)
    return {"dicts": load_dicts(dicts_path), "cache": cache, **out}


@pytest.mark.parametrize("name,version", [("adaptive", 4), ("sets", 6)])
def test_adaptive_file_round_trips_to_the_in_memory_codec(files, name, version):
    path, size, cfg = files[name]
    sets = cfg.set_indices
    cache, ds = files["cache"], files["dicts"]
    reader = csrfile.open_csr(path)
    assert reader.header.version == version and reader.header.config.adaptive and reader.header.config.set_indices == sets
    # the counts are paid for: the payload is never larger than the fixed file's (the header says "adaptive")
    assert reader.header.payload_nbytes <= csrfile.open_csr(files["fixed"][0]).header.payload_nbytes
    dec = csrfile.read_csr(path, ds)
    s, end = cfg.sink, T - cfg.window
    for layer in range(len(cache.keys)):
        k, v = cache.keys[layer], cache.values[layer]
        want_k = codec.roundtrip_keys(k[:, :, s:end], ds.get(layer, "k"), 3, "fp8", "omp", 3 + s, cache.meta["rope"], adaptive=True, sets=sets)
        assert torch.equal(dec.keys[layer][:, :, s:end], want_k)
        want_v = codec.roundtrip(v[:, :, s:end], ds.get(layer, "v"), 2, "fp8", "omp", adaptive=True, kind="v", sets=sets)
        assert torch.equal(dec.values[layer][:, :, s:end], want_v)
        assert torch.equal(dec.keys[layer][:, :, :s], k[:, :, :s]) and torch.equal(dec.values[layer][:, :, end:], v[:, :, end:])


@pytest.mark.parametrize("name", ["adaptive", "sets"])
def test_adaptive_file_is_deterministic(files, tmp_path, name):
    path, _, cfg = files[name]
    ds_path = make_dicts(tmp_path / "d.safetensors")
    write(tmp_path / "again.csr", files["cache"], ds_path, cfg)
    assert (tmp_path / "again.csr").read_bytes() == path.read_bytes()


def _section(seed: int = 0):
    """An adaptive section whose last vector gives up its last atom, so the last stored slot is unused."""
    atoms = unit(2 * N, D, seed).reshape(2, 1, N, D)
    x = torch.randn(1, 2, 12, D, generator=torch.Generator().manual_seed(seed))
    sec = codec.encode_section(x, torch.zeros(1, 2, 3, D), atoms, 3, "fp8", "omp", None, True, sets=False)
    k = int(sec.counts[0, 1, 11, 0])
    sec.counts[0, 1, 11, 0] = k - 1
    sec.idx[0, 1, 11, 0, k - 1] = 0
    sec.q.view(torch.uint8)[1, 11, k - 1] = 0
    return bytearray(csrsection.section_bytes(sec, N, 3, "fp8")), sec


def _ints(q: torch.Tensor) -> torch.Tensor:
    return q.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[q.element_size()])


def _parse(buf: bytes, sets: bool = False):
    return csrsection.parse_section(bytes(buf), (1, 2, 15, D), N, 1, 3, "fp8", 1, torch.float32, 2, True, sets)


def _checked(buf: bytes, sec, sets: bool = False):
    """(vectors, S_max, count bits, where the counts start) of _section's layout, after checking it parses back."""
    back = _parse(buf, sets)
    assert torch.equal(back.idx, sec.idx) and torch.equal(back.counts, sec.counts)
    return 2 * 12, codec.adaptive_max(3, D, N), codec.count_bits(3, D, N), 4 * 2


def test_adaptive_section_parses_back_and_rejects_bad_counts_and_dirty_slots():
    buf, sec = _section()
    m, smax, cbits, start = _checked(buf, sec)
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
@pytest.mark.parametrize("sets", [False, True])
def test_adaptive_sections_round_trip_in_every_coefficient_format(coef, chunks, sets):
    """Bytes -> codes -> bytes for each coefficient format and value split; the size is the one the header implies
    and never more than the fixed section's."""
    d = D if coef not in budget.NARROW_MOST else 48 * chunks  # int4/int3 code chunks of at least 8·S / 16·S channels
    atoms = unit(2 * chunks * N, d // chunks, 6).reshape(2, chunks, N, d // chunks)
    x = torch.randn(1, 2, 20, d, generator=torch.Generator().manual_seed(7))
    tail = torch.randn(1, 2, 5, d, generator=torch.Generator().manual_seed(8)).half()
    assert codec.section_format(coef, "v", 3, d // chunks) == coef
    sec = codec.encode_section(x, tail, atoms, 3, coef, "omp", None, True, "v", sets)
    buf = csrsection.section_bytes(sec, N, 3, coef, sets)
    shape = (1, 2, 25, d)
    assert len(buf) == csrsection.section_nbytes(shape, N, chunks, 3, coef, 1, torch.float16, 4, True, sets)
    assert len(buf) <= csrsection.section_nbytes(shape, N, chunks, 3, coef, 1, torch.float16, 4, False) + 1
    back = csrsection.parse_section(buf, shape, N, chunks, 3, coef, 1, torch.float16, 4, True, sets)
    assert torch.equal(back.idx, sec.idx) and torch.equal(back.counts, sec.counts) and torch.equal(back.verbatim, sec.verbatim)
    assert torch.equal(_ints(back.q), _ints(sec.q))
    assert csrsection.section_bytes(back, N, 3, coef, sets) == buf
    got = codec.decode_section(back, atoms, coef)
    assert torch.equal(got, codec.decode_section(sec, atoms, coef))


def test_adaptive_header_fields_are_validated(files):
    from csrtool.formats.csrheader import header_from_json

    obj = csrfile.open_csr(files["adaptive"][0]).header.to_json()
    assert obj["version"] == 4 and obj["codec"]["adaptive"] is True
    with pytest.raises(CsrError, match="codec.adaptive must be true in a version 4 header"):
        header_from_json({**obj, "codec": {**obj["codec"], "adaptive": 1}})
    with pytest.raises(CsrError, match="codec.adaptive is only allowed in a version 4 to 6 header"):
        header_from_json({**obj, "version": 1})
    obj6 = csrfile.open_csr(files["sets"][0]).header.to_json()
    assert obj6["version"] == 6 and obj6["codec"]["adaptive"] is True and header_from_json(obj6).config.set_indices
    with pytest.raises(CsrError, match="codec.adaptive must be true in a version 6 header"):
        header_from_json({**obj6, "codec": {**obj6["codec"], "adaptive": False}})
    assert not header_from_json({**obj6, "version": 4}).config.set_indices  # the same fields read as the fixed layout


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
    assert res.exit_code == 0 and ".csr v6" in res.output and "adaptive counts" in res.output  # v6: set-coded indices
    res = runner.invoke(app, ["inspect", str(tmp_path / "a.csr"), "--json"])
    want = [codec.section_format(codec.DEFAULT_COEF, "k", 3, D), codec.section_format(codec.DEFAULT_COEF, "v", 2, D // 2)]  # values in 2 chunks
    assert res.exit_code == 0 and json.loads(res.output)["section_coefs"] == [want] * len(files["cache"].keys)
    res = runner.invoke(app, ["decompress", str(tmp_path / "a.csr"), "-d", str(d), "-o", str(tmp_path / "r.pt")])
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- set-coded indices (version 6)


def test_set_codes_round_trip_multisets_and_cost_what_they_say():
    g = torch.Generator().manual_seed(3)
    for b in (1, 6, 13):
        for s in (1, 4, 24):
            counts = torch.randint(0, s + 1, (300,), generator=g)
            idx = torch.randint(0, 1 << b, (300, s), generator=g)  # repeats included: MP may pick an atom twice
            idx = torch.where(torch.arange(s)[None] < counts[:, None], idx, 0)
            idx, _ = setcode.sort_codes(idx, idx.clone(), counts)
            values, widths = setcode.encode(idx, counts, b)
            assert int(widths.sum()) == sum(setcode.set_bits(int(k), b) for k in counts)
            assert torch.equal(widths, setcode.field_widths(counts, b, s))
            buf = packing.pack_fields(values, widths, int(widths.sum()) + 11)
            back, pad_ok = packing.unpack_fields(buf, widths)
            assert pad_ok and torch.equal(back, values)
            out, ok = setcode.decode(back, counts, b, s)
            assert ok and torch.equal(out, idx)
    # the savings: log2(k!) bits less than fixed fields, to within a few bits of the bound log2 C(N, k)
    for k, want in ((1, 13), (3, 37), (6, 69), (12, 128), (24, 244)):
        assert setcode.set_bits(k, 13) == want
        assert math.log2(math.comb(8192, k)) <= want <= 13 * k


def test_sort_codes_moves_coefficients_with_their_indices():
    idx = torch.tensor([[9, 2, 5, 0], [7, 7, 1, 3]])
    cf = torch.tensor([[0.9, 0.2, 0.5, 0.0], [0.7, -0.7, 0.1, 0.3]])
    i2, c2 = setcode.sort_codes(idx, cf, torch.tensor([3, 2]))
    assert i2.tolist() == [[2, 5, 9, 0], [7, 7, 1, 3]] and c2.tolist()[0] == pytest.approx([0.2, 0.5, 0.9, 0.0])
    assert c2.tolist()[1] == pytest.approx([0.7, -0.7, 0.1, 0.3])  # ties keep their order (stable)


def _set_section():
    atoms = unit(2 * N, D, 0).reshape(2, 1, N, D)
    x = torch.randn(1, 2, 12, D, generator=torch.Generator().manual_seed(0))
    sec = codec.encode_section(x, torch.zeros(1, 2, 3, D), atoms, 3, "fp8", "omp", None, True)
    return bytearray(csrsection.section_bytes(sec, N, 3, "fp8", True)), sec


def _parse_set(buf: bytes):
    return _parse(buf, True)


def test_set_coded_section_rejects_what_no_writer_makes():
    buf, sec = _set_section()
    m, smax, cbits, start = _checked(buf, sec, True)
    stream_start = start + packing.packed_nbytes(m, cbits)
    verbatim = 3 * 2 * D * 4
    # counts whose codes would not fit the section's bits
    bad = bytearray(buf)
    bad[start:stream_start] = packing.pack_indices(torch.full((m,), smax), cbits).numpy().tobytes()
    with pytest.raises(CsrError, match="over the section's bits"):
        _parse_set(bad)
    # nonzero bits after the codes (the stream's last byte, before the verbatim tokens)
    cost = codec.adaptive_cost(3, D, N, "fp8")
    nbits = codec.adaptive_bits(m, 3, D, N, "fp8")
    assert int(cost[sec.counts.reshape(-1)].sum()) <= nbits < 8 * packing.packed_nbytes(nbits, 1)  # the last bit is padding
    bad = bytearray(buf)
    bad[len(buf) - verbatim - 1] |= 0x80
    with pytest.raises(CsrError, match="nonzero padding"):
        _parse_set(bad)
    # every other single-bit flip in the codes is either refused or decodes to valid codes: never a crash
    for byte in range(stream_start, len(buf) - verbatim):
        bad = bytearray(buf)
        bad[byte] ^= 0x04
        try:
            got = _parse_set(bad)
        except CsrError:
            continue
        assert bool((got.idx < N).all()) and bool((got.idx >= 0).all())


def test_set_coded_section_refuses_indices_out_of_order_and_beyond_the_dictionary():
    """Hand-made streams of one vector of 3 atoms: a rank at its bound, an index past N, two atoms in descending order."""
    from csrtool.formats.csrsection import _parse_sets

    n_atoms, k = 48, 3  # not a power of two: 6-bit indices can name atoms that do not exist
    counts = torch.tensor([k])
    b = packing.index_bits(n_atoms)
    h = setcode.high_bits(k, b)
    assert h == 3 and setcode.rank_bits(k, h) == 7  # ranks below C(10, 3) = 120 in 7 bits: 120..127 are invalid

    def parse(idx_fields: torch.Tensor) -> None:
        widths = torch.cat([torch.full((k,), 8), setcode.field_widths(counts, b, k)])
        values = torch.cat([torch.full((k,), 0x38), idx_fields])
        _parse_sets(packing.pack_fields(values, widths, int(widths.sum())), int(widths.sum()) + 64, counts, n_atoms, k, 2, 64, "fp8")

    ok_v, _ = setcode.encode(torch.tensor([[3, 33, 40]]), counts, b)
    parse(ok_v)  # valid
    with pytest.raises(CsrError, match="atom index out of range"):
        parse(torch.cat([torch.tensor([120]), ok_v[1:]]))  # rank at its bound
    big, _ = setcode.encode(torch.tensor([[3, 33, 63]]), counts, b)
    with pytest.raises(CsrError, match="atom index out of range"):
        parse(big)
    same_top, _ = setcode.encode(torch.tensor([[3, 32, 33]]), counts, b)  # 32 and 33 share their top 3 bits
    swapped = same_top.clone()
    swapped[2], swapped[3] = same_top[3], same_top[2]
    with pytest.raises(CsrError, match="ascending order"):
        parse(swapped)
