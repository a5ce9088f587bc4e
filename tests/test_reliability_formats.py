"""Issue 14's file-format cases: every hostile or unlucky input is one clean CsrError line, nothing
unreadable is written, decode never overflows, and the same input gives the same bytes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from csrtool import codec
from csrtool.cli import app
from csrtool.errors import CsrError
from csrtool.formats import csrfile
from csrtool.formats.dicts import load_dicts, save_dicts
from csrtool.formats.kvcache import KVCache, load_cache, save_cache
from csrtool.keyspace import RopeParams

from test_csrfile import D, INV_FREQ, make_atoms, make_cache, make_dicts, write

runner = CliRunner()
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The CLI failed with exit 1 and exactly one line on stderr, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def csr(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    dicts_path = make_dicts(d / "dicts.safetensors")
    path = d / "c.csr"
    write(path, make_cache(), dicts_path, codec.CodecConfig(3, 2, "fp8", "omp", window=5, sink=2))
    return {"dir": d, "dicts_path": dicts_path, "path": path, "bytes": path.read_bytes()}


def edited(raw: bytes, edit) -> bytes:
    """The file with its header JSON replaced by edit(header) (text or object) and the checksum recomputed."""
    hlen = struct.unpack("<I", raw[12:16])[0]
    obj = json.loads(raw[16 : 16 + hlen])
    new = edit(obj)
    body = (new if isinstance(new, str) else json.dumps(obj, allow_nan=True)).encode("ascii")
    data = raw[:12] + struct.pack("<I", len(body)) + body + raw[16 + hlen : -32]
    return data + hashlib.sha256(data).digest()


def open_error(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "edited.csr"
    p.write_bytes(data)
    with pytest.raises(CsrError) as exc:
        csrfile.open_csr(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p} is corrupted (invalid header: ") and msg.endswith("): compress the cache again") and "\n" not in msg
    return msg


# ---------------------------------------------------------------- 14.5, 14.8, 9.8: header fields


@pytest.mark.parametrize("field,value,says", [
    ("scaling", math.inf, "Infinity is not JSON"),  # json.dumps writes Infinity
    ("scaling", math.nan, "NaN is not JSON"),
    ("scaling", 1e300, "rope.scaling must be a finite number in [0.001, 1000], got 1e+300"),
    ("scaling", "1", "rope.scaling must be a number, got '1'"),
    ("inv_freq", [math.inf] * (D // 2), "Infinity is not JSON"),
    ("inv_freq", [1e300] * (D // 2), "rope.inv_freq[0] must be a finite number in [0, 10000], got 1e+300"),
    ("inv_freq", [10 ** 400] * (D // 2), "rope.inv_freq[0] must be a finite number in [0, 10000], got 1000000000000"),
    ("inv_freq", INV_FREQ + INV_FREQ, f"rope.inv_freq has {D} entries but layers[0] has key head_dim {D} (needs {D // 2})"),
    ("inv_freq", [-1.0] * (D // 2), "rope.inv_freq[0] must be a finite number in [0, 10000], got -1.0"),
    ("position_offset", 10 ** 30, "rope.position_offset must be an integer in [0, 2147483647], got 1000000000000000000000000000000"),
    ("position_offset", -1, "rope.position_offset must be an integer in [0, 2147483647], got -1"),
    ("position_offset", "abc", "rope.position_offset must be an integer in [0, 2147483647], got 'abc'"),
])
def test_edited_rope_is_refused_naming_the_field(csr, tmp_path, field, value, says):
    def edit(obj):
        obj["rope"][field] = value
    msg = open_error(tmp_path, edited(csr["bytes"], edit))
    assert says.split(" (")[0].split(", got")[0] in msg, msg


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999999", "-1e999999"])
def test_header_json_is_rfc8259(csr, tmp_path, literal):
    """NaN, Infinity and numbers that overflow a double are not JSON: refused even inside `meta`."""
    def edit(obj):
        return json.dumps(obj).replace('"meta": {', f'"meta": {{"x": {literal}, ', 1)
    msg = open_error(tmp_path, edited(csr["bytes"], edit))
    assert ("is not JSON" in msg) or ("out of range" in msg), msg


@pytest.mark.parametrize("path,value,says", [
    (("codec", "n_atoms"), 10 ** 40, "codec.n_atoms must be an integer in [2, 16777216]"),
    (("version",), 1.0, "version must be an integer in [1, 6], got 1.0"),
    (("codec", "index_bits"), 6.0, "codec.index_bits must be an integer in [1, 24], got 6.0"),
    (("codec", "window"), -1, "codec.window must be an integer in [0, 2147483648], got -1"),
    (("codec", "coef"), "fp4", "codec.coef must be one of fp16, fp8, int8, got 'fp4'"),
    (("codec", "sparsity_k"), True, "codec.sparsity_k must be an integer in [1, 65536], got True"),
    (("dicts", "n_groups"), 7, "dicts.n_groups 7 must be 1 or the 2 KV heads of layers[0]"),
    (("dicts", "fingerprint"), "xyz", "dicts.fingerprint must be 64 lowercase hex digits, got 'xyz'"),
    (("layers",), [[1, 2, 24, 16, 16]] * 2 + [[0, 2, 24, 16, 16]], "layers[2][0] must be an integer in [1, 2147483648], got 0"),
    (("layers",), [[1, 10 ** 40, 24, 16, 16]] * 2, "layers[0][1] must be an integer in [1, 2147483648]"),
    (("meta",), [1, 2], "meta must be an object, got [1, 2]"),
    (("dtype",), "float8_e4m3fn", "dtype must be one of float16, bfloat16, float32, got 'float8_e4m3fn'"),
])
def test_edited_header_field_is_named(csr, tmp_path, path, value, says):
    def edit(obj):
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    assert says in open_error(tmp_path, edited(csr["bytes"], edit))


def test_decompress_of_edited_header_is_one_line(csr, tmp_path):
    """14.8: inv_freq of the wrong length used to be a RuntimeError at decompress; huge integers an OverflowError."""
    for n, edit in enumerate([lambda o: o["rope"].update(inv_freq=INV_FREQ[:3]), lambda o: o["rope"].update(scaling=10 ** 400)]):
        p = tmp_path / f"e{n}.csr"
        p.write_bytes(edited(csr["bytes"], edit))
        line = one_line_error(run("decompress", p, "--dicts", csr["dicts_path"], "-o", tmp_path / f"o{n}.pt"))
        assert "invalid header: rope." in line
        assert not (tmp_path / f"o{n}.pt").exists()


@FUZZ
@given(data=st.data())
def test_fuzz_rope_fields(csr, tmp_path, data):
    """Hypothesis over the rope fields: a header either decodes to finite keys or is one CsrError."""
    number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10 ** 30), 10 ** 30), st.text(max_size=3), st.none())
    field = data.draw(st.sampled_from(["scaling", "position_offset", "inv_freq"]))
    value = data.draw(st.lists(number, min_size=0, max_size=D) if field == "inv_freq" else number)

    def edit(obj):
        obj["rope"][field] = value
    p = tmp_path / "fz.csr"
    p.write_bytes(edited(csr["bytes"], edit))
    try:
        dec = csrfile.read_csr(p, load_dicts(csr["dicts_path"]))
    except CsrError as exc:
        assert "\n" not in str(exc)
        return
    assert all(bool(torch.isfinite(t).all()) for t in dec.keys + dec.values)


# ---------------------------------------------------------------- 14.6: decode what was verified


def test_bytes_changed_after_verification_are_refused(csr, tmp_path):
    p = tmp_path / "c.csr"
    p.write_bytes(csr["bytes"])
    reader = csrfile.open_csr(p)  # verified
    raw = bytearray(csr["bytes"])
    raw[reader.header_end + 10] ^= 0x01  # a coefficient scale byte of layer 0 changes after the check
    p.write_bytes(bytes(raw))
    with pytest.raises(CsrError, match=r"changed while being read \(checksum mismatch\): read it again"):
        list(reader.layers(load_dicts(csr["dicts_path"])))
    p.write_bytes(csr["bytes"] + b"x")  # appended bytes: the digest is no longer the file's end
    with pytest.raises(CsrError, match="changed while being read"):
        list(reader.layers(load_dicts(csr["dicts_path"])))
    p.write_bytes(csr["bytes"])
    assert len(list(reader.layers(load_dicts(csr["dicts_path"])))) == 2


# ---------------------------------------------------------------- 14.2: never write what cannot be read back


def test_huge_cache_values_are_refused_before_writing(tmp_path):
    dicts = make_dicts(tmp_path / "d.safetensors", key_space="post-rope")
    cache = make_cache(meta={"model": "tiny"})
    cache.values[1][0, 0, 8] = 3e38
    cache.values[1][0, 1, 9] = -3e38
    save_cache(tmp_path / "big.pt", cache)
    line = one_line_error(run("compress", tmp_path / "big.pt", "--dicts", dicts, "-o", tmp_path / "c.csr", "--sparsity", "2"))
    assert line.startswith("error: cache layer 1: values too large to code (max |x| = 3e+38")
    assert sorted(os.listdir(tmp_path)) == ["big.pt", "d.safetensors"]  # nothing written, no temporary left
    cache = make_cache()  # keys: a pre-RoPE dictionary rotates them first, and that overflows
    cache.keys[0][0, 0, 10] = 3e38
    save_cache(tmp_path / "bigk.pt", cache)
    line = one_line_error(run("compress", tmp_path / "bigk.pt", "--dicts", make_dicts(tmp_path / "pre.safetensors"), "-o", tmp_path / "c.csr", "--sparsity", "2"))
    assert line.startswith("error: cache layer 0: keys too large to rotate into the dictionary's key space (max |k| = 3e+38")
    assert not (tmp_path / "c.csr").exists()


@pytest.mark.parametrize("what", ["nan_atom", "inf_mean"])
def test_non_finite_dictionary_is_refused(tmp_path, what):
    """A dictionary with a valid fingerprint but NaN atoms or an Inf mean used to compress 'fine'."""
    atoms = make_atoms()
    means = {name: torch.zeros(a.shape[0], a.shape[1] * a.shape[3]) for name, a in atoms.items()}
    if what == "nan_atom":
        atoms["layer.1.k"][0, 0, 5, 2] = float("nan")
    else:
        means["layer.0.v"][1, 3] = float("inf")
    path = tmp_path / "d.safetensors"
    save_dicts(path, atoms, {}, {"key_space": "pre-rope"}, {}, means=means)
    name = "layer.1.k" if what == "nan_atom" else "layer.0.v.mean"
    with pytest.raises(CsrError, match=f"{name} contains NaN or Inf values: re-run csrtool train-dict"):
        load_dicts(path)


def test_predictor_map_shapes_and_channel_scales(tmp_path):
    """A map with channel scales ([H, D + 2, D]) makes a version 2 file; one without ([H, D + 1, D], older csrtool) still
    loads as version 1; a channel scale that is not positive, or another shape, is refused."""
    atoms = make_atoms()
    d = {name: a.shape[1] * a.shape[3] for name, a in atoms.items()}
    with_c = {name: torch.cat([torch.randn(2, n + 1, n), torch.rand(2, 1, n) + 0.5], 1) for name, n in d.items()}
    for maps, version in ((with_c, "2"), ({name: m[:, :-1] for name, m in with_c.items()}, "1"), ({}, "1")):
        save_dicts(tmp_path / "d.safetensors", atoms, {}, {"key_space": "pre-rope"}, {}, maps=maps)
        with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
            assert f.metadata()["version"] == version
        got = load_dicts(tmp_path / "d.safetensors")
        assert {k: tuple(v.shape) for k, v in got.maps.items()} == {k: tuple(v.shape) for k, v in maps.items()}
    for bad, says in (("zero", "channel scales that are not positive"), ("shape", "shape \\[2, 19, 16\\], expected \\[H, 18, 16\\]")):
        maps = {name: m.clone() for name, m in with_c.items()}
        maps["layer.0.k"] = torch.cat([maps["layer.0.k"], maps["layer.0.k"][:, -1:]], 1) if bad == "shape" else maps["layer.0.k"]
        if bad == "zero":
            maps["layer.0.k"][1, -1, 3] = 0.0
        save_dicts(tmp_path / "d.safetensors", atoms, {}, {"key_space": "pre-rope"}, {}, maps=maps)
        with pytest.raises(CsrError, match=f"predictor map of layer.0.k has {says}"):
            load_dicts(tmp_path / "d.safetensors")


# ---------------------------------------------------------------- 14.3: sparsity that cannot work


def test_sparsity_beyond_half_the_channels_is_refused(tmp_path):
    dicts = make_dicts(tmp_path / "d.safetensors")
    save_cache(tmp_path / "c.pt", make_cache())
    s_k = 3 * D // 4  # fewer than the channels and the atoms, more than half the channels
    line = one_line_error(run("compress", tmp_path / "c.pt", "--dicts", dicts, "-o", tmp_path / "c.csr", "--sparsity", f"{s_k},{D // 4}"))
    assert line == (f"error: sparsity {s_k} for layer 0 keys is more than half its {D} channels: such codes cost more than 8-bit "
                    f"storage and their coefficients cannot be quantised (a near full-rank fit): use at most {D // 2} (--sparsity) or a lower --bits")
    assert not (tmp_path / "c.csr").exists()
    # --bits far above what codes can use picks the cap, and says so
    r = run("compress", tmp_path / "c.pt", "--dicts", dicts, "-o", tmp_path / "c.csr", "--bits", "100", "--uniform")
    assert r.exit_code == 0, r.output
    assert f"S_k={D // 2} S_v={D // 4}" in r.stdout and "--bits 100 is more than sparse codes can use" in r.stderr


def test_full_rank_fit_needs_cancelling_coefficients():
    """Why: with S = D atoms OMP fits exactly, and an ill-conditioned support gives coefficients far above
    the vector's norm; fp8 (3 mantissa bits) cannot hold their cancellation. S = D/2 stays accurate."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(1, 1, 64, D, generator=g), dim=-1)
    x = torch.randn(1, 1, 256, D, generator=g)

    def err(s, coef):
        return float((codec.roundtrip(x, atoms, s, coef) - x).pow(2).sum() / x.pow(2).sum())
    assert err(D, "fp8") > 10 * err(D, "fp16")
    assert err(D // 2, "fp8") < 0.1
    with pytest.raises(CsrError, match="sparsity 5 for layer 0 keys is more than the dictionary's 4 atoms: use at most 4"):
        codec.check_sparsity(5, 64, "layer 0 keys", 4)
    assert codec.choose_sparsity(100.0, 4096, 64, 2, "fp8") == (32, 16)


# ---------------------------------------------------------------- 14.4: no overflow at decode


def test_float16_cache_near_max_decodes_finite(tmp_path):
    dicts_path = make_dicts(tmp_path / "d.safetensors", key_space="post-rope")
    g = torch.Generator().manual_seed(0)
    big = [((torch.randint(0, 2, (1, 2, 24, D), generator=g) * 2 - 1) * 65504.0).half() for _ in range(4)]
    cache = KVCache(big[:2], big[2:], {"model": "tiny"})
    ds = load_dicts(dicts_path)
    # the float32 reconstruction does exceed float16's range: a plain cast would give Inf
    assert float(codec.decode_codes(*codec.encode_codes(big[0].float(), ds.get(0, "k"), 4, "omp"), ds.get(0, "k")).abs().max()) > 65504
    write(tmp_path / "c.csr", cache, dicts_path, codec.CodecConfig(4, 2, "fp8", "omp", window=2, sink=0))
    dec = csrfile.read_csr(tmp_path / "c.csr", ds)
    assert all(bool(torch.isfinite(t).all()) for t in dec.keys + dec.values)
    assert float(dec.keys[0].abs().max()) == 65504.0


# ---------------------------------------------------------------- 14.9, 14.10: malformed caches


@pytest.mark.parametrize("shape", [(0, 2, 24, D), (1, 0, 24, D)])
def test_empty_batch_or_heads_refused_before_writing(tmp_path, shape):
    dicts = make_dicts(tmp_path / "d.safetensors")
    z = torch.zeros(shape)
    torch.save({"keys": [z, z], "values": [z, z], "meta": {}}, tmp_path / "c.pt")
    line = one_line_error(run("compress", tmp_path / "c.pt", "--dicts", dicts, "-o", tmp_path / "c.csr", "--sparsity", "2"))
    assert "has an empty dimension" in line
    assert not (tmp_path / "c.csr").exists()


def _cache_obj(**change):
    c = make_cache()
    obj = {"keys": c.keys, "values": c.values, "meta": c.meta}
    obj.update(change)
    return obj


MALFORMED = {
    "meta_list": (_cache_obj(meta=[1, 2]), "meta must be a dict, got list"),
    "meta_str": (_cache_obj(meta="abc"), "meta must be a dict, got str"),
    "meta_int_key": (_cache_obj(meta={1: "x", "a": 2}), "meta key 1 is not a string"),
    "meta_nan": (_cache_obj(meta={"model": "m", "x": float("nan")}), "meta is not plain JSON"),
    "rope_strings": (_cache_obj(meta={"key_space": "post-rope", "rope": {"inv_freq": ["a"] * 8, "scaling": "1"}}),
                     "cache meta.rope.inv_freq[0] must be a number, got 'a'"),
    "rope_not_list": (_cache_obj(meta={"key_space": "post-rope", "rope": {"inv_freq": 5}}), "cache meta.rope.inv_freq must be a list"),
    "offset_abc": (_cache_obj(meta={"key_space": "post-rope", "rope": {"inv_freq": INV_FREQ, "scaling": 1.0}, "position_offset": "abc"}),
                   "cache meta.position_offset must be an integer in [0, 2147483647], got 'abc'"),
    "keys_int": (_cache_obj(keys=5), "'keys' must be a list of tensors [B, H, T, D], got int"),
    "keys_list_of_ints": (_cache_obj(keys=[1, 2]), "layer 0 does not hold tensors"),
    "keys_int_tensors": (_cache_obj(keys=[torch.ones(1, 2, 24, D, dtype=torch.int64)] * 2), "csrtool reads float16, bfloat16 and float32 caches"),
    "keys_nan": (_cache_obj(keys=[torch.full((1, 2, 24, D), float("nan"))] * 2), "contains NaN or Inf values"),
    "float8": (_cache_obj(keys=[k.to(torch.float8_e4m3fn) for k in make_cache().keys]), "csrtool reads float16, bfloat16 and float32 caches"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_cache_contents_are_one_line(tmp_path, case):
    obj, says = MALFORMED[case]
    dicts = make_dicts(tmp_path / "d.safetensors")
    torch.save(obj, tmp_path / "c.pt")
    line = one_line_error(run("compress", tmp_path / "c.pt", "--dicts", dicts, "-o", tmp_path / "c.csr", "--sparsity", "2"))
    assert says in line, line
    assert not (tmp_path / "c.csr").exists()


@FUZZ
@given(meta=st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4), st.lists(st.floats(), max_size=3)), max_size=4),
    rope=st.one_of(st.none(), st.fixed_dictionaries({"inv_freq": st.lists(st.one_of(st.floats(), st.integers(), st.text(max_size=2)), max_size=D),
                                                      "scaling": st.one_of(st.floats(), st.text(max_size=2))})))
def test_fuzz_cache_meta(tmp_path, meta, rope):
    """Hypothesis over cache meta: make_header either builds a header that encodes or raises one CsrError."""
    if rope is not None:
        meta = {**meta, "rope": rope, "key_space": "post-rope"}
    ds = load_dicts(make_dicts(tmp_path / "d.safetensors")) if not (tmp_path / "d.safetensors").exists() else load_dicts(tmp_path / "d.safetensors")
    c = make_cache()
    try:
        cache = KVCache(c.keys, c.values, meta)
        header = csrfile.make_header(cache, ds, codec.CodecConfig(2, 2))
    except CsrError as exc:
        assert "\n" not in str(exc)
        return
    assert header.encode()
    assert header.rope is None or all(math.isfinite(f) for f in header.rope.inv_freq)


@FUZZ
@given(scales=st.lists(st.sampled_from([1.0, 1e10, 1e30, 1e36, 3e38, -3e38, 65504.0]), min_size=4, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), coef=st.sampled_from(["fp8", "fp16", "int8"]))
def test_fuzz_cache_values_write_only_what_reads_back(tmp_path, scales, dtype, coef):
    """Hypothesis over cache magnitudes: compress either refuses with one CsrError and writes nothing,
    or writes a file that decodes to finite values of the cache's dtype."""
    dicts_path = tmp_path / "d.safetensors"
    if not dicts_path.exists():
        make_dicts(dicts_path)
    c = make_cache()
    keys = [(k * s).to(dtype) for k, s in zip(c.keys, scales[:2])]
    values = [(v * s).to(dtype) for v, s in zip(c.values, scales[2:])]
    cache = KVCache(keys, values, c.meta)
    out = tmp_path / "f.csr"
    out.unlink(missing_ok=True)
    ds = load_dicts(dicts_path)
    try:
        cache.validate()
        write(out, cache, dicts_path, codec.CodecConfig(3, 2, coef, "omp", window=2, sink=1))
    except CsrError as exc:
        assert "\n" not in str(exc) and not out.exists()
        return
    dec = csrfile.read_csr(out, ds)
    assert all(t.dtype == dtype and bool(torch.isfinite(t).all()) for t in dec.keys + dec.values)


# ---------------------------------------------------------------- 14.11: dictionary metadata


@pytest.mark.parametrize("key,value,says", [
    ("version", "abc", "corrupted version field 'abc'"),
    ("source", "[1, 2]", "source must be a JSON object, got list"),
    ("source", '{"key_space": "sideways"}', "source.key_space 'sideways'"),
    ("config", "NaN", "config is not JSON"),
    ("sensitivity", '{"curves": {"layer.0.k": [1, "x"]}}', "layer.0.k holds 'x'"),
    ("sensitivity", '{"curves": {"layer.0.k": [1, -2]}}', "layer.0.k holds -2"),
    ("sensitivity", '{"curves": {"layer.x.k": [1]}}', "curve name 'layer.x.k'"),
    ("sensitivity", '{"curves": [1]}', "curves must be an object"),
    ("sensitivity", '{"curves": {"layer.0.k": []}}', "layer.0.k must be a non-empty list of numbers"),
])
def test_dictionary_metadata_is_validated(tmp_path, key, value, says):
    good = make_dicts(tmp_path / "d.safetensors")
    with safe_open(str(good), "pt") as fh:
        meta = fh.metadata()
    save_file(load_file(str(good)), str(tmp_path / "bad.safetensors"), {**meta, key: value})  # atoms intact: fingerprint valid
    with pytest.raises(CsrError, match="re-run csrtool train-dict") as exc:
        load_dicts(tmp_path / "bad.safetensors")
    assert says in str(exc.value)


# ---------------------------------------------------------------- 14.16: hostile pickles


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("legacy", [False, True])
def test_code_running_pickle_is_one_clean_line(tmp_path, legacy):
    p = tmp_path / "evil.pt"
    if legacy:
        torch.save({"keys": [_Evil()]}, p, _use_new_zipfile_serialization=False, pickle_protocol=4)
    else:
        torch.save({"keys": [_Evil()]}, p)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = run("compress", p, "--dicts", make_dicts(tmp_path / "d.safetensors"), "-o", tmp_path / "c.csr")
    line = one_line_error(r)
    what = "" if legacy else " (it references print)"  # the legacy format fails on an opcode before naming the global
    assert line == (f"error: {p} needs arbitrary unpickling to load, which csrtool refuses for safety{what}: "
                    "save the cache as plain tensors (csrtool cache, or a dict/tuple of tensors)")
    assert "this must never run" not in r.output
    assert not [w for w in seen if "pickle" in str(w.message).lower() or "weights_only" in str(w.message)]


# ---------------------------------------------------------------- 14.18: same input, same bytes


def test_decompress_output_is_byte_identical(csr, tmp_path):
    for name in ("a.pt", "b.pt"):
        r = run("decompress", csr["path"], "--dicts", csr["dicts_path"], "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    c = load_cache(tmp_path / "a.pt")
    save_cache(tmp_path / "x.pt", c)
    save_cache(tmp_path / "y.pt", c)
    assert (tmp_path / "x.pt").read_bytes() == (tmp_path / "y.pt").read_bytes()


# ---------------------------------------------------------------- RopeParams


def test_rope_params_validate():
    assert RopeParams.from_meta({"rope": {"inv_freq": INV_FREQ, "scaling": 1.0}, "position_offset": 3}).position_offset == 3
    assert RopeParams((1.0,), 2.0, 5).shifted(2) == RopeParams((1.0,), 2.0, 7)
    with pytest.raises(CsrError, match=r"rope.scaling must be a finite number in \[0.001, 1000\], got nan"):
        RopeParams((1.0,), float("nan"))
    with pytest.raises(CsrError, match="rope.inv_freq must be a non-empty list"):
        RopeParams(())
