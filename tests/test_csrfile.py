"""The .csr file: exact bytes, round trip, accounting, and every corruption -> CsrError."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csrtool import codec
from csrtool.formats import csrfile, csrsection
from csrtool.formats.dicts import load_dicts, save_dicts
from csrtool.engine import packing
from csrtool.errors import CsrError
from csrtool.formats.kvcache import KVCache

L, H, D, N, T = 2, 2, 16, 64, 24
INV_FREQ = (1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))).tolist()


def make_atoms(seed=0, groups=H, split=2, n=N, d=D):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(L):
        out[f"layer.{layer}.k"] = torch.nn.functional.normalize(torch.randn(groups, 1, n, d, generator=g), dim=-1)
        out[f"layer.{layer}.v"] = torch.nn.functional.normalize(torch.randn(groups, split, n, d // split, generator=g), dim=-1)
    return out


def make_dicts(path: Path, seed=0, key_space="pre-rope", **kw) -> Path:
    save_dicts(path, make_atoms(seed, **kw), {"n_atoms": N}, {"key_space": key_space, "model": "tiny"}, {})
    return path


def make_cache(seed=0, t=T, dtype=torch.float32, meta=None) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(1, H, t, D, generator=g).to(dtype) for _ in range(L)]
    values = [torch.randn(1, H, t, D, generator=g).to(dtype) for _ in range(L)]
    m = {"model": "tiny", "key_space": "post-rope", "rope": {"inv_freq": INV_FREQ, "scaling": 1.0}, "position_offset": 3}
    return KVCache(keys, values, m if meta is None else meta)


def write(path: Path, cache: KVCache, dicts_path: Path, cfg: codec.CodecConfig) -> int:
    ds = load_dicts(dicts_path)
    header = csrfile.make_header(cache, ds, cfg)
    return csrfile.write_csr(path, header, csrfile.encode_sections(cache, ds, header))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("csr")
    dicts_path = make_dicts(d / "dicts.safetensors")
    cache = make_cache()
    path = d / "cache.csr"
    cfg = codec.CodecConfig(3, 2, "fp8", "omp", window=5, sink=2)
    write(path, cache, dicts_path, cfg)
    return {"dir": d, "dicts_path": dicts_path, "dicts": load_dicts(dicts_path), "cache": cache, "path": path, "cfg": cfg,
            "decoded": csrfile.read_csr(path, load_dicts(dicts_path)), "bytes": path.read_bytes()}


# ---------------------------------------------------------------- exact bytes


def test_exact_header_bytes():
    header = csrfile.CsrHeader(
        dtype="float16", layers=((1, 2, 8, 4, 4),), n_atoms=4096, config=codec.CodecConfig(4, 2, "fp8", "omp", 2, sink=1),
        value_split=2, key_space="post-rope", cache_key_space="post-rope", dict_fingerprint="ab" * 32,
        dict_scope="layer", dict_groups=1, model="m", rope=None, meta={"model": "m"},
    )
    body = (
        b'{"codec":{"cache_key_space":"post-rope","coef":"fp8","index_bits":12,"key_space":"post-rope",'
        b'"method":"omp","n_atoms":4096,"sink":1,"sparsity_k":4,"sparsity_v":2,"value_split":2,"window":2},'
        b'"dicts":{"fingerprint":"' + b"ab" * 32 + b'","n_groups":1,"scope":"layer"},"dtype":"float16",'
        b'"format":"csrtool-csr","layers":[[1,2,8,4,4]],"meta":{"model":"m"},"model":"m","rope":null,"version":1}'
    )
    want = b"\x89CSR\r\n\x1a\n" + b"\x01\x00" + b"\x00\x00" + struct.pack("<I", len(body)) + body
    assert header.encode() == want
    # T = 8 tokens: 1 sink, 5 coded, 2 tail. K = 2 group scales (8) + 10 vectors x 4 codes x 12 bits (60)
    # + 40 fp8 (40) + sink and tail 2 heads x 3 tokens x 4 fp16 (48); V = 8 + 10 x 2 chunks x 2 codes x 12 bits (60) + 40 + 48
    assert header.section_sizes(0) == (8 + 60 + 40 + 48, 8 + 60 + 40 + 48)
    assert header.file_nbytes == len(want) + 156 + 156 + 32


def test_file_layout_and_checksum(env):
    raw = env["bytes"]
    assert raw[:8] == csrfile.MAGIC
    _, version, flags, hlen = struct.unpack("<8sHHI", raw[:16])
    assert (version, flags) == (1, 0)
    assert raw[-32:] == hashlib.sha256(raw[:-32]).digest()
    header = csrfile.open_csr(env["path"]).header
    assert len(raw) == 16 + hlen + header.payload_nbytes + 32
    # the first key section starts with the float32 group scales, then 12-bit... (6-bit here) indices
    sk, _ = header.section_sizes(0)
    m = 1 * H * (T - 5 - 2)
    assert sk == 4 * H + packing.packed_nbytes(m * 3, 6) + m * 3 + H * (2 + 5) * D * 4


# ---------------------------------------------------------------- round trip


def test_roundtrip_matches_in_memory_codec(env):
    cache, dec, ds, cfg = env["cache"], env["decoded"], env["dicts"], env["cfg"]
    s, end = cfg.sink, T - cfg.window  # coded tokens [s, end)
    assert dec.meta == cache.meta
    for layer in range(L):
        k, v = cache.keys[layer], cache.values[layer]
        assert dec.keys[layer].shape == k.shape and dec.keys[layer].dtype == k.dtype
        # the sink and the tail are lossless
        for part in (slice(0, s), slice(end, T)):
            assert torch.equal(dec.keys[layer][:, :, part], k[:, :, part])
            assert torch.equal(dec.values[layer][:, :, part], v[:, :, part])
        # the coded part is exactly what codec.roundtrip / roundtrip_keys give (positions from offset 3 + s)
        k_hat = codec.roundtrip_keys(k[:, :, s:end], ds.get(layer, "k"), 3, "fp8", "omp", 3 + s, cache.meta["rope"])
        assert torch.equal(dec.keys[layer][:, :, s:end], k_hat)
        assert torch.equal(dec.values[layer][:, :, s:end], codec.roundtrip(v[:, :, s:end], ds.get(layer, "v"), 2, "fp8", "omp"))


def test_deterministic_bytes(env, tmp_path):
    write(tmp_path / "again.csr", env["cache"], env["dicts_path"], env["cfg"])
    assert (tmp_path / "again.csr").read_bytes() == env["bytes"]


@pytest.mark.parametrize("coef", ["fp16", "int8", "int4", "fp8/int3", "int3/fp16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_formats_and_dtypes(tmp_path, coef, dtype):
    dicts_path = make_dicts(tmp_path / "d.safetensors", groups=1, split=1, key_space="post-rope")
    cache = make_cache(1, t=9, dtype=dtype, meta={"model": "x"})
    sp = 1 if "int" in coef and coef != "int8" else 4  # within the narrow formats' atoms (8 channels: int4 1, int3 none)
    cfg = codec.CodecConfig(sp, sp, coef, "mp", window=2, sink=0)
    size = write(tmp_path / "c.csr", cache, dicts_path, cfg)
    assert size == (tmp_path / "c.csr").stat().st_size
    reader = csrfile.open_csr(tmp_path / "c.csr")
    assert reader.header.dict_scope == "layer" and reader.header.dtype == str(dtype).split(".")[1]
    dec = csrfile.read_csr(tmp_path / "c.csr", load_dicts(dicts_path))
    assert reader.header.version == (1 if coef in ("fp16", "int8") else 5)  # per-side or int4/int3 coefficients: version 5
    assert reader.header.section_coefs(0) == codec.coef_sides(coef)
    for layer in range(L):
        want = codec.roundtrip(cache.keys[layer][:, :, :7], load_dicts(dicts_path).get(layer, "k"), sp, coef, "mp")
        assert torch.equal(dec.keys[layer][:, :, :7], want)
        want = codec.roundtrip(cache.values[layer][:, :, :7], load_dicts(dicts_path).get(layer, "v"), sp, coef, "mp", kind="v")
        assert torch.equal(dec.values[layer][:, :, :7], want)
        assert torch.equal(dec.values[layer][:, :, 7:], cache.values[layer][:, :, 7:])


def test_window_longer_than_cache_is_lossless(tmp_path):
    dicts_path = make_dicts(tmp_path / "d.safetensors")
    cache = make_cache(2, t=4)
    write(tmp_path / "c.csr", cache, dicts_path, codec.CodecConfig(2, 2, window=64))
    dec = csrfile.read_csr(tmp_path / "c.csr", load_dicts(dicts_path))
    assert all(torch.equal(a, b) for a, b in zip(dec.keys + dec.values, cache.keys + cache.values))


# ---------------------------------------------------------------- accounting


def test_bits_per_channel_and_choose_sparsity():
    # the paper's accounting spends fp16 + an int16 index = 32 bits per atom; ours packs indices (12 bits at N=4096).
    assert codec.bits_per_channel(4096, 128, 4, 2, 2, "fp16") == (4 * 28 + 4 * 28) / 256
    assert codec.bits_per_channel(4096, 64, 2, 1, 2, "fp8") == 40 / 64
    assert codec.vector_bits(4096, 3, 1, "int8") == 3 * 20 + 16
    assert codec.vector_bits(4096, 3, 1, "int3") == 3 * 15 + 8  # 3-bit coefficients, one fp8 scale per vector
    assert codec.vector_bits(4096, 2, 2, "int4") == 4 * 16 + 8
    # keys and values in their own formats: fp8 keys (2 x 20 bits), int3 values in 2 chunks (2 x 15 + 8)
    assert codec.bits_per_channel(4096, 64, 2, 1, 2, "fp8/int3") == (40 + 38) / 128
    for bits in (0.5, 0.75, 1.0, 1.5, 2.0, 4.0):
        for coef in packing.COEF_FORMATS:
            if codec.bits_per_channel(4096, 64, 1, 1, 2, coef) > bits:
                continue
            s_k, s_v = codec.choose_sparsity(bits, 4096, 64, 2, coef)
            assert codec.bits_per_channel(4096, 64, s_k, s_v, 2, coef) <= bits
            # no room left for one more atom on either side
            assert codec.bits_per_channel(4096, 64, s_k + 1, s_v, 2, coef) > bits or codec.bits_per_channel(4096, 64, s_k, s_v + 1, 2, coef) > bits or s_k >= 64
    # among the pairs that fill the budget, key cost closest to twice the value cost (keys dominate perplexity)
    assert codec.choose_sparsity(1.0, 4096, 64, 1, "fp8") == (4, 2)  # 120 of 128 bits: 80 K + 40 V
    assert codec.choose_sparsity(2.0, 4096, 64, 1, "fp8") == (8, 4)
    assert codec.choose_sparsity(1.0, 4096, 64, 2, "fp8") == (4, 1)  # V: 2 chunks x 1 atom = 40 bits
    # the paper's 1-bit budget at d=128 and fp16 (256 bits): (5, 2) and (7, 1) both use 252 bits and are equally
    # far from 2:1 (140 vs 112, 196 vs 56); the tie goes to more key atoms
    assert codec.choose_sparsity(1.0, 4096, 128, 2, "fp16") == (7, 1)
    with pytest.raises(CsrError, match=re.escape("--bits 0.1 is below the smallest code (0.4688 bits per channel")):
        codec.choose_sparsity(0.1, 4096, 64, 2, "fp8")


def test_size_report(env):
    hd = csrfile.open_csr(env["path"]).header
    rep = csrfile.size_report(hd, len(env["bytes"]))
    ch = L * H * T * 2 * D
    assert rep["channels"] == ch
    assert rep["bits_per_channel"]["with_header"] == 8 * len(env["bytes"]) / ch
    assert rep["ratio_vs_fp16"] == 2 * ch / len(env["bytes"])
    assert rep["code_bits_per_channel"]["k"] == 3 * (6 + 8) / D


def test_coefficient_specs():
    assert codec.coef_sides("fp8") == ("fp8", "fp8") and codec.coef_sides("fp8/int3") == ("fp8", "int3")
    assert codec.coef_side("int4/fp16", "k") == "int4" and codec.coef_side("int4/fp16", "v") == "fp16"
    for bad in ("fp8/", "/int3", "fp8/int3/int4", "fp8/int2", "", "FP8"):
        with pytest.raises(CsrError, match="coefficient format must be one of"):
            codec.coef_sides(bad)
    cfg = codec.CodecConfig(1, 1, "fp8/fp8")
    assert cfg.coef == "fp8" and codec.CodecConfig(1, 1, "fp8/int3").section_coef("v", 64) == "int3"


def test_narrow_formats_give_way_to_fp8_past_their_atoms():
    """int4 codes at most Dc/8 atoms per chunk, int3 Dc/16; beyond, the section is fp8, and the bits follow."""
    assert [codec.section_format("fp8/int4", "v", s, 64) for s in (1, 8, 9)] == ["int4", "int4", "fp8"]
    assert [codec.section_format("int3/fp16", "k", s, 64) for s in (4, 5)] == ["int3", "fp8"]
    assert codec.section_format("int3/fp16", "v", 60, 64) == "fp16"
    assert codec.bits_per_channel(4096, 64, 8, 8, 1, "fp8/int4") == (8 * 20 + 8 * 16 + 8) / 128
    assert codec.bits_per_channel(4096, 64, 9, 9, 1, "fp8/int4") == (9 * 20 + 9 * 20) / 128
    assert codec.CodecConfig(3, 9, "fp8/int4").section_coef("v", 64) == "fp8"


def test_version_5_header_fields(tmp_path):
    from csrtool.formats.csrheader import header_from_json

    dicts_path = make_dicts(tmp_path / "d.safetensors")
    write(tmp_path / "c.csr", make_cache(3), dicts_path, codec.CodecConfig(3, 2, "fp8/int3", window=5, sink=2))
    obj = csrfile.open_csr(tmp_path / "c.csr").header.to_json()
    assert obj["version"] == 5 and obj["codec"]["coef"] == "fp8/int3" and obj["codec"]["adaptive"] is False
    with pytest.raises(CsrError, match=re.escape("codec.coef fp8 belongs in a version 1-4 header, not version 5")):
        header_from_json({**obj, "codec": {**obj["codec"], "coef": "fp8"}})
    with pytest.raises(CsrError, match=re.escape("codec.coef must be a coefficient format, or keys/values (e.g. fp8/int3), got")):
        header_from_json({**obj, "codec": {**obj["codec"], "coef": "fp8/int9"}})
    with pytest.raises(CsrError, match="codec.adaptive must be true or false in a version 5 header"):
        header_from_json({**obj, "codec": {k: v for k, v in obj["codec"].items() if k != "adaptive"}})
    with pytest.raises(CsrError, match="codec.coef must be one of"):  # a version 4 reader's formats
        header_from_json({**obj, "version": 4, "codec": {**obj["codec"], "adaptive": True}})


def test_narrow_coefficients_are_checked_on_read(tmp_path):
    """A value section of int3 codes: a field at -4 (never written) and a negative fp8 vector scale are corruption."""
    atoms = make_atoms(4)["layer.0.k"]  # [H, 1, N, D]
    x = torch.randn(1, H, 6, D, generator=torch.Generator().manual_seed(9))
    sec = codec.encode_section(x, torch.zeros(1, H, 1, D), atoms, 1, "int3", "omp")  # int3: at most D/16 = 1 atom
    assert sec.v is not None and sec.v.dtype == torch.float8_e4m3fn
    buf = bytearray(csrsection.section_bytes(sec, N, 1, "int3"))
    shape, m = (1, H, 7, D), H * 6
    back = csrsection.parse_section(bytes(buf), shape, N, 1, 1, "int3", 1, torch.float32, 0)
    assert torch.equal(back.q, sec.q) and torch.equal(back.v.view(torch.uint8), sec.v.view(torch.uint8))
    vstart = 4 * H  # after the group scales
    bad = bytearray(buf)
    bad[vstart] |= 0x80  # the first vector scale's sign bit
    with pytest.raises(CsrError, match="negative int3 vector scale"):
        csrsection.parse_section(bytes(bad), shape, N, 1, 1, "int3", 1, torch.float32, 0)
    cstart = vstart + m + packing.packed_nbytes(m, packing.index_bits(N))
    bad = bytearray(buf)
    bad[cstart] = (bad[cstart] & ~0x07) | 0x04  # the first coefficient's field: 100 = -4
    with pytest.raises(CsrError, match="int3 coefficient -4"):
        csrsection.parse_section(bytes(bad), shape, N, 1, 1, "int3", 1, torch.float32, 0)


def test_config_validates():
    with pytest.raises(CsrError, match=re.escape("sparsity_k must be an integer >= 1, got 0")):
        codec.CodecConfig(0, 1)
    with pytest.raises(CsrError, match=re.escape("coefficient format must be one of fp16, fp8, int8, int4, int3, or one for keys and one for values written keys/values (e.g. fp8/int3), got 'fp4'")):
        codec.CodecConfig(1, 1, "fp4")
    with pytest.raises(CsrError, match=re.escape("window must be an integer >= 0 (tokens kept uncompressed), got -1")):
        codec.CodecConfig(1, 1, window=-1)
    with pytest.raises(CsrError, match=re.escape("sink must be an integer >= 0 (first tokens kept uncompressed), got -1")):
        codec.CodecConfig(1, 1, sink=-1)


# ---------------------------------------------------------------- bad input


def corrupt(env, tmp_path, data: bytes) -> Path:
    p = tmp_path / "bad.csr"
    p.write_bytes(data)
    return p


def read_err(path: Path, dicts) -> str:
    with pytest.raises(CsrError) as exc:
        csrfile.read_csr(path, dicts)
    return str(exc.value)


def test_truncated(env, tmp_path):
    raw = env["bytes"]
    p = corrupt(env, tmp_path, raw[:-100])
    assert read_err(p, env["dicts"]) == f"{p} is truncated (expected {len(raw)} bytes, found {len(raw) - 100}): compress the cache again"
    p = corrupt(env, tmp_path, raw[:20])
    assert read_err(p, env["dicts"]) == f"{p} is truncated (20 bytes, a .csr file has at least 48): compress the cache again"


def test_bad_magic(env, tmp_path):
    p = corrupt(env, tmp_path, b"PK\x03\x04" + env["bytes"][4:])
    assert read_err(p, env["dicts"]) == f"{p} is not a .csr file (bad magic): pass a file written by csrtool compress"


def test_newer_version(env, tmp_path):
    raw = bytearray(env["bytes"])
    raw[8:10] = struct.pack("<H", 7)
    p = corrupt(env, tmp_path, bytes(raw))
    assert read_err(p, env["dicts"]) == f"{p} has .csr format version 7, newer than this csrtool (6): upgrade csrtool"


def test_flipped_payload_byte(env, tmp_path):
    raw = bytearray(env["bytes"])
    raw[len(raw) // 2] ^= 0x10
    p = corrupt(env, tmp_path, bytes(raw))
    assert read_err(p, env["dicts"]) == f"{p} is corrupted (checksum mismatch): compress the cache again"


def test_wrong_dictionary(env, tmp_path):
    other = load_dicts(make_dicts(tmp_path / "other.safetensors", seed=5))
    msg = read_err(env["path"], other)
    assert msg == (
        f"dictionary mismatch: {env['path']} was compressed with dictionary {env['dicts'].fingerprint[:16]}, "
        f"the given one is {other.fingerprint[:16]}: pass the dictionary file used by csrtool compress"
    )


def test_dictionary_cache_shape_mismatch(tmp_path):
    ds = load_dicts(make_dicts(tmp_path / "d.safetensors", d=8))
    with pytest.raises(CsrError) as exc:
        csrfile.make_header(make_cache(), ds, codec.CodecConfig(2, 2))
    assert str(exc.value) == (
        "dictionary/cache shape mismatch: the cache's keys (layer 0) has head_dim 16 but the dictionary covers "
        "1 x 8 = 8 channels: use a dictionary trained for this model"
    )
    ds = load_dicts(make_dicts(tmp_path / "d3.safetensors", groups=3))
    with pytest.raises(CsrError, match=re.escape("the dictionary has 3 head groups but the cache's keys (layer 0) has 2 KV heads")):
        csrfile.make_header(make_cache(), ds, codec.CodecConfig(2, 2))


def test_pre_rope_dictionary_needs_rope_info(env):
    with pytest.raises(CsrError) as exc:
        csrfile.make_header(make_cache(meta={"source_format": "legacy-tuple"}), env["dicts"], codec.CodecConfig(2, 2))
    assert str(exc.value).startswith("the dictionary codes keys before RoPE but the cache carries no RoPE parameters (meta.rope)")


def test_interrupted_write_leaves_nothing(env, tmp_path):
    ds = env["dicts"]
    header = csrfile.make_header(env["cache"], ds, env["cfg"])

    def sections():
        yield next(csrfile.encode_sections(env["cache"], ds, header))
        raise KeyboardInterrupt

    out = tmp_path / "out.csr"
    with pytest.raises(KeyboardInterrupt):
        csrfile.write_csr(out, header, sections())
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- fuzzing


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corruptions(env, tmp_path, data):
    raw = bytearray(env["bytes"])
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        pos = data.draw(st.integers(0, len(raw)))
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    p = tmp_path / "fuzz.csr"
    p.write_bytes(bytes(raw))
    try:
        dec = csrfile.read_csr(p, env["dicts"])
    except CsrError:
        return
    good = env["decoded"]
    assert all(torch.equal(a, b) for a, b in zip(dec.keys + dec.values, good.keys + good.values))


# ---------------------------------------------------------------- per-layer sparsity (version 2)


def test_per_layer_sparsity_round_trip(env, tmp_path):
    cache, ds = env["cache"], env["dicts"]
    cfg = codec.CodecConfig(4, 3, "fp8", "omp", window=5, sink=2, layer_sparsity=((4, 1), (1, 3)))
    path = tmp_path / "v2.csr"
    size = write(path, cache, env["dicts_path"], cfg)
    raw = path.read_bytes()
    assert struct.unpack("<H", raw[8:10])[0] == 2 and size == len(raw)
    header = csrfile.open_csr(path).header
    assert header.version == 2 and header.config.layer_sparsity == ((4, 1), (1, 3))
    assert b'"layer_sparsity":[[4,1],[1,3]]' in raw
    m = H * (T - 5 - 2)
    assert header.section_sizes(0)[0] == 4 * H + packing.packed_nbytes(m * 4, 6) + m * 4 + H * 7 * D * 4
    assert header.section_sizes(1)[0] == 4 * H + packing.packed_nbytes(m * 1, 6) + m * 1 + H * 7 * D * 4
    dec = csrfile.read_csr(path, ds)
    s, end = 2, T - 5
    for layer, (sk, sv) in enumerate(cfg.layer_sparsity):
        k, v = cache.keys[layer], cache.values[layer]
        want_k = codec.roundtrip_keys(k[:, :, s:end], ds.get(layer, "k"), sk, "fp8", "omp", 3 + s, cache.meta["rope"])
        assert torch.equal(dec.keys[layer][:, :, s:end], want_k)
        assert torch.equal(dec.values[layer][:, :, s:end], codec.roundtrip(v[:, :, s:end], ds.get(layer, "v"), sv, "fp8", "omp"))
    # code bits average the layers: K (4 + 1) / 2 atoms x (6 + 8) bits / 16 channels
    rep = csrfile.size_report(header, size)
    assert rep["code_bits_per_channel"]["k"] == pytest.approx(2.5 * 14 / D)


def test_per_layer_sparsity_must_cover_every_layer(env, tmp_path):
    cfg = codec.CodecConfig(4, 3, "fp8", "omp", window=5, sink=2, layer_sparsity=((4, 1), (1, 3)))
    path = tmp_path / "v2.csr"
    write(path, env["cache"], env["dicts_path"], cfg)
    raw = path.read_bytes()
    bad = raw.replace(b'"layer_sparsity":[[4,1],[1,3]]', b'"layer_sparsity":[[4,1]]      ')  # same length
    hlen = struct.unpack("<I", bad[12:16])[0]
    body = bad[16 : 16 + hlen]
    fixed = bad[:-32] + hashlib.sha256(bad[:-32]).digest()  # a valid checksum: the header itself is what is wrong
    p = corrupt(env, tmp_path, fixed)
    assert b"[[4,1]]" in body
    assert read_err(p, env["dicts"]) == (
        f"{p} is corrupted (invalid header: codec.layer_sparsity must list one [S_k, S_v] per layer (2), got [[4, 1]]): compress the cache again"
    )
    with pytest.raises(CsrError, match=r"layer_sparsity\[1\] must be a pair of integers >= 1, got \(1, 0\)"):
        codec.CodecConfig(4, 3, layer_sparsity=((4, 1), (1, 0)))


def test_centred_dictionaries_round_trip(env, tmp_path):
    """A dictionary with means: the file codes x - mean and decodes back to codec.roundtrip(..., mean)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(5)
    means = {f"layer.{layer}.{kind}": torch.randn(H, D, generator=g) for layer in range(L) for kind in "kv"}
    dpath = tmp_path / "centred.safetensors"
    save_dicts(dpath, make_atoms(), {"n_atoms": N}, {"key_space": "pre-rope", "model": "tiny"}, {}, means=means)
    ds = load_dicts(dpath)
    assert ds.fingerprint != env["dicts"].fingerprint  # the means are part of the dictionary's identity
    torch.testing.assert_close(ds.mean(1, "k"), means["layer.1.k"])
    cache = env["cache"]
    path = tmp_path / "c.csr"
    write(path, cache, dpath, env["cfg"])
    dec = csrfile.read_csr(path, ds)
    s, end = 2, T - 5
    for layer in range(L):
        k, v = cache.keys[layer], cache.values[layer]
        want_k = codec.roundtrip_keys(k[:, :, s:end], ds.get(layer, "k"), 3, "fp8", "omp", 3 + s, cache.meta["rope"], mean=ds.mean(layer, "k"))
        assert torch.equal(dec.keys[layer][:, :, s:end], want_k)
        want_v = codec.roundtrip(v[:, :, s:end], ds.get(layer, "v"), 2, "fp8", "omp", mean=ds.mean(layer, "v"))
        assert torch.equal(dec.values[layer][:, :, s:end], want_v)
    # a mean of the wrong shape, or one edited after training, is refused
    t = load_file(str(dpath))
    meta = __import__("safetensors").safe_open(str(dpath), "pt").metadata()
    t["layer.0.k.mean"] = t["layer.0.k.mean"] + 1
    save_file(t, str(tmp_path / "edited.safetensors"), meta)
    with pytest.raises(CsrError, match="modified after training"):
        load_dicts(tmp_path / "edited.safetensors")
