"""Per-layer rotations (Gemma 3: theta 10,000 on sliding layers, 1,000,000 on full ones): RopeParams.layers,
the .csr header that carries them (version 3), and the codec and eval coding each layer's keys before its own RoPE."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from csrtool import codec
from csrtool.collect import capture_kv
from csrtool.errors import CsrError
from csrtool.formats import csrfile
from csrtool.formats.csrheader import parse_header
from csrtool.formats.dicts import DictSet, load_dicts, save_dicts
from csrtool.formats.kvcache import KVCache
from csrtool.keyspace import RopeParams
from csrtool.models import rope_info
from tiny import tiny_model

SLIDING = tuple(10_000.0 ** (-i / 8) for i in range(0, 8, 2))
FULL = tuple(1_000_000.0 ** (-i / 8) for i in range(0, 8, 2))


# ---------------------------------------------------------------- RopeParams


def test_for_layer_picks_the_override_and_keeps_the_offset():
    rp = RopeParams(SLIDING, 1.0, 5, ((1, FULL, 2.0),))
    assert rp.for_layer(1) == RopeParams(FULL, 2.0, 5)
    assert rp.for_layer(0) == rp.for_layer(7) == RopeParams(SLIDING, 1.0, 5)
    assert rp.shifted(3).for_layer(1) == RopeParams(FULL, 2.0, 8)
    assert RopeParams.from_json(rp.to_json()) == rp
    assert "layers" not in RopeParams(SLIDING).to_json()  # one rotation: the JSON of older files, unchanged


@pytest.mark.parametrize("layers,says", [
    (((0, FULL[:3], 1.0),), "rope.layers[0].inv_freq has 3 entries but rope.inv_freq has 4"),
    (((0, (float("inf"),) * 4, 1.0),), "rope.layers[0].inv_freq[0] must be a finite number in [0, 10000], got inf"),
    (((0, FULL, 0.0),), "rope.layers[0].scaling must be a finite number in [0.001, 1000], got 0.0"),
    (((1, FULL, 1.0), (1, FULL, 1.0)), "rope.layers[1].layer must be an integer in [2, 2147483647] (increasing, no repeats), got 1"),
    (((-1, FULL, 1.0),), "rope.layers[0].layer must be an integer in [0, 2147483647]"),
    (((True, FULL, 1.0),), "rope.layers[0].layer must be an integer"),
    (((0, FULL),), "rope.layers[0] must be (layer, inv_freq, scaling)"),
])
def test_per_layer_rotation_is_validated_naming_the_field(layers, says):
    with pytest.raises(CsrError) as exc:
        RopeParams(SLIDING, 1.0, 0, layers)
    assert str(exc.value).startswith(says), str(exc.value)


@pytest.mark.parametrize("layers,says", [
    ({"1": {"inv_freq": list(FULL)}}, "cache meta.rope.layers must be a list of {layer, inv_freq, scaling} objects"),
    ([[1, list(FULL)]], "cache meta.rope.layers[0] must be an object with layer, inv_freq and scaling"),
    ([{"layer": "1", "inv_freq": list(FULL)}], "cache meta.rope.layers[0].layer must be an integer in [0, 2147483647], got '1'"),
    ([{"layer": 1, "inv_freq": list(FULL)}, {"layer": 0, "inv_freq": list(FULL)}],
     "cache meta.rope.layers[1].layer must be greater than the layer before it (1), got 0"),
    ([{"layer": 1, "inv_freq": ["a"] * 4}], "cache meta.rope.layers[0].inv_freq[0] must be a number, got 'a'"),
    ([{"layer": 1, "inv_freq": list(FULL) * 2}], "cache meta.rope.layers[0].inv_freq has 8 entries but cache meta.rope.inv_freq has 4"),
    ([{"layer": 1, "inv_freq": list(FULL), "scaling": 1e9}], "cache meta.rope.layers[0].scaling must be a finite number in [0.001, 1000]"),
])
def test_cache_meta_per_layer_rotation_is_validated(layers, says):
    with pytest.raises(CsrError) as exc:
        RopeParams.from_meta({"rope": {"inv_freq": list(SLIDING), "scaling": 1.0, "layers": layers}})
    msg = str(exc.value)
    assert msg.startswith(says) and msg.endswith("save the cache again with csrtool cache"), msg


# ---------------------------------------------------------------- a tiny Gemma 3 cache through the codec and the file


def identity_dicts(key_space: str = "pre-rope", layers: int = 2) -> DictSet:
    """Key atoms = the 8 unit vectors and their negatives: S = 8 atoms code any key exactly (OMP); random value atoms."""
    eye = torch.cat([torch.eye(8), -torch.eye(8)])
    g = torch.Generator().manual_seed(0)
    atoms = {}
    for layer in range(layers):
        atoms[f"layer.{layer}.k"] = eye[None, None].clone()
        atoms[f"layer.{layer}.v"] = torch.nn.functional.normalize(torch.randn(1, 2, 16, 4, generator=g), dim=-1)
    return DictSet(atoms=atoms, source={"key_space": key_space, "model": "tiny-gemma3"}, means={})


@pytest.fixture(scope="module")
def gemma():
    model = tiny_model("gemma3")
    ids = torch.arange(5, 45)[None]
    post, values = capture_kv(model, ids)
    pre, _ = capture_kv(model, ids, "pre-rope", rope_info(model))
    return {"model": model, "post": post, "pre": pre, "values": values, "rope": rope_info(model)}


def test_codec_round_trip_codes_each_layer_before_its_own_rope(gemma):
    """Exact codes: what encode_layer codes is each layer's own pre-RoPE keys, and decode_layer gives the cache's keys back."""
    ds, rp = identity_dicts(), RopeParams.from_meta({"rope": gemma["rope"]})
    cfg = codec.CodecConfig(8, 4, "fp16", "omp", window=3, sink=2)
    for layer in range(2):
        k, v = gemma["post"][layer], gemma["values"][layer]
        ck, cv = codec.encode_layer(k, v, ds.get(layer, "k"), ds.get(layer, "v"), cfg, "pre-rope", "post-rope", rp.for_layer(layer))
        coded = codec.decode_section(ck, ds.get(layer, "k"), "fp16")
        assert torch.allclose(coded, gemma["pre"][layer][:, :, 2:-3], atol=2e-3), layer
        k_hat, _ = codec.decode_layer(ck, cv, ds.get(layer, "k"), ds.get(layer, "v"), cfg, "pre-rope", "post-rope", rp.for_layer(layer), k.dtype)
        assert torch.allclose(k_hat, k, atol=2e-3), layer
        via_eval = codec.roundtrip_keys(k, ds.get(layer, "k"), 8, "fp16", "omp", 0, gemma["rope"], layer=layer)
        assert torch.allclose(via_eval, k, atol=2e-3), layer
    with pytest.raises(AssertionError, match="for_layer"):  # a rotation with per-layer parts must be narrowed to one layer first
        codec.to_code_space(gemma["post"][1], "pre-rope", "post-rope", rp)


def test_csr_file_with_per_layer_rotations(gemma, tmp_path):
    """compress -> decompress of a Gemma 3 cache: version 3 header, strict round trip, keys back per layer."""
    ds = identity_dicts()
    dpath = tmp_path / "d.safetensors"
    save_dicts(dpath, ds.atoms, {"n_atoms": 16}, ds.source, {})
    cache = KVCache(gemma["post"], gemma["values"], {"model": "tiny", "key_space": "post-rope", "rope": gemma["rope"], "position_offset": 4})
    header = csrfile.make_header(cache, load_dicts(dpath), codec.CodecConfig(4, 2, "fp16", "omp", window=3, sink=2))
    assert header.version == 3 and header.rope.layers == ((1, pytest.approx(FULL), 1.0),)
    raw = header.encode()
    assert struct.unpack("<H", raw[8:10])[0] == 3
    assert parse_header(raw[16:]) == header
    path = tmp_path / "g.csr"
    csrfile.write_csr(path, header, csrfile.encode_sections(cache, load_dicts(dpath), header))
    dec = csrfile.read_csr(path, load_dicts(dpath))
    for layer in range(2):  # the coded keys are exactly eval's round trip of the layer, at positions offset + sink + t
        want = codec.roundtrip_keys(cache.keys[layer][:, :, 2:-3], ds.get(layer, "k"), 4, "fp16", "omp", 4 + 2, gemma["rope"], layer=layer)
        assert torch.equal(dec.keys[layer][:, :, 2:-3], want), layer
    common = codec.roundtrip_keys(cache.keys[1][:, :, 2:-3], ds.get(1, "k"), 4, "fp16", "omp", 4 + 2, gemma["rope"], layer=0)
    assert not torch.allclose(dec.keys[1][:, :, 2:-3], common, atol=1e-3)  # the sliding layers' rotation codes layer 1 otherwise


def _edited(raw: bytes, edit, version: int | None = None) -> bytes:
    hlen = struct.unpack("<I", raw[12:16])[0]
    obj = json.loads(raw[16 : 16 + hlen])
    edit(obj)
    body = json.dumps(obj).encode("ascii")
    ver = obj["version"] if version is None else version
    data = raw[:8] + struct.pack("<HHI", ver, 0, len(body)) + body + raw[16 + hlen : -32]
    return data + hashlib.sha256(data).digest()


@pytest.mark.parametrize("edit,says", [
    (lambda o: o["rope"]["layers"][0].update(layer=2), "rope.layers[0].layer is 2 but there are only 2 layers"),
    (lambda o: o["rope"].pop("layers"), "rope.layers (per-layer rotations) is required in a version 3 header"),
    (lambda o: o.update(version=1), "rope.layers (per-layer rotations) is only allowed in a version 3 or 4 header"),
    (lambda o: o["rope"]["layers"][0]["inv_freq"].append(1.0), "rope.layers[0].inv_freq has 5 entries but rope.inv_freq has 4"),
])
def test_edited_per_layer_rotation_is_refused(gemma, tmp_path, edit, says):
    ds = identity_dicts()
    dpath = tmp_path / "d.safetensors"
    save_dicts(dpath, ds.atoms, {"n_atoms": 16}, ds.source, {})
    cache = KVCache(gemma["post"], gemma["values"], {"model": "tiny", "key_space": "post-rope", "rope": gemma["rope"]})
    header = csrfile.make_header(cache, load_dicts(dpath), codec.CodecConfig(4, 2, "fp16", "omp", window=3, sink=2))
    path = tmp_path / "g.csr"
    csrfile.write_csr(path, header, csrfile.encode_sections(cache, load_dicts(dpath), header))
    bad = tmp_path / "bad.csr"
    bad.write_bytes(_edited(path.read_bytes(), edit))
    with pytest.raises(CsrError) as exc:
        csrfile.open_csr(bad)
    assert says in str(exc.value), str(exc.value)


def test_cache_meta_naming_a_missing_layer_is_refused(gemma):
    rope = {**gemma["rope"], "layers": [{**gemma["rope"]["layers"][0], "layer": 5}]}
    cache = KVCache(gemma["post"], gemma["values"], {"key_space": "post-rope", "rope": rope})
    with pytest.raises(CsrError, match=r"cache meta.rope.layers\[0\].layer is 5 but there are only 2 layers: the cache meta is inconsistent"):
        csrfile.make_header(cache, identity_dicts(), codec.CodecConfig(4, 2, "fp16", "omp"))


def test_eval_csr_codes_each_layer_before_its_own_rope(gemma):
    """eval's CSR method (Reconstructor) on Gemma 3 with S = 4 of 8 unit-vector atoms: each key keeps its 4 largest
    pre-RoPE coordinates (the k_norm output's, see test_collect), rotated back with the layer's own theta."""
    from csrtool.engine import rope
    from csrtool.eval.csr import CSR

    method = CSR(identity_dicts(), 2, 2, 8, sparsity=(4, 2), method="omp", coef="fp16", rope_info=gemma["rope"])
    t = gemma["post"][0].shape[2]
    for layer, inv in ((0, SLIDING), (1, FULL)):
        got = method.reconstruct(layer, "k", gemma["post"][layer][:, :, 10:], torch.arange(10, t))
        pre = gemma["pre"][layer][:, :, 10:]
        top = pre.abs().topk(4, dim=-1).indices
        kept = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))
        want = rope.rotate(kept, torch.arange(10, t), torch.tensor(inv))
        assert torch.allclose(got, want, atol=2e-3), layer


def test_cli_cache_compress_decompress_on_gemma3(tiny_model_dirs, tmp_path):
    """csrtool cache saves the per-layer rotations in the cache meta; compress with pre-RoPE dictionaries writes
    a version 3 file; decompress gives each layer exactly eval's round trip of its keys."""
    from typer.testing import CliRunner

    from csrtool.cli import app
    from csrtool.formats.kvcache import load_cache

    run = CliRunner().invoke
    res = run(app, ["cache", "-m", str(tiny_model_dirs["gemma3"]), "--prompt", "The quick brown fox. " * 4, "-o", str(tmp_path / "c.pt")])
    assert res.exit_code == 0, res.output
    kv = load_cache(tmp_path / "c.pt")
    assert [r["layer"] for r in kv.meta["rope"]["layers"]] == [1]
    ds = identity_dicts()
    save_dicts(tmp_path / "d.safetensors", ds.atoms, {"n_atoms": 16}, ds.source, {})
    res = run(app, ["compress", str(tmp_path / "c.pt"), "--dicts", str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "c.csr"),
                    "--sparsity", "4,2", "--coef", "fp16", "--window", "3", "--fixed"])
    assert res.exit_code == 0, res.output
    assert csrfile.open_csr(tmp_path / "c.csr").header.version == 3
    res = run(app, ["decompress", str(tmp_path / "c.csr"), "--dicts", str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "b.pt")])
    assert res.exit_code == 0, res.output
    back, sink = load_cache(tmp_path / "b.pt"), codec.DEFAULT_SINK
    for layer in range(2):
        want = codec.roundtrip_keys(kv.keys[layer][:, :, sink:-3], ds.get(layer, "k"), 4, "fp16", "omp", sink, kv.meta["rope"], layer=layer)
        assert torch.equal(back.keys[layer][:, :, sink:-3], want), layer
