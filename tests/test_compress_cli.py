"""`csrtool compress / decompress / inspect` end to end, with every bad input's message."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from csrtool.cli import app
from csrtool.formats.dicts import save_dicts
from csrtool.formats.kvcache import KVCache, from_dynamic_cache, load_cache, save_cache, to_dynamic_cache

from test_csrfile import make_cache, make_dicts

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def err_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    return result.stderr.strip()


@pytest.fixture()
def files(tmp_path):
    dicts = make_dicts(tmp_path / "dicts.safetensors")
    cache_path = tmp_path / "cache.pt"
    save_cache(cache_path, make_cache())
    return tmp_path, dicts, cache_path


def test_compress_inspect_decompress(files):
    d, dicts, cache_path = files
    r = run("compress", cache_path, "--dicts", dicts, "-o", d / "c.csr", "--bits", "1.5", "--window", "4", "--json", d / "rep.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((d / "rep.json").read_text())
    # budget 1.5 bits x 2 x 16 channels = 48 bits per K+V pair; 6-bit index + fp8 = 14 bits per atom
    assert (rep["sparsity_k"], rep["sparsity_v"]) == (1, 1) and rep["code_bits_per_channel"]["avg"] <= 1.5
    assert "S_k=1 S_v=1" in r.stdout
    r = run("inspect", d / "c.csr", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["file_bytes"] == (d / "c.csr").stat().st_size
    assert info["header"]["codec"]["window"] == 4 and info["header"]["codec"]["key_space"] == "pre-rope"
    assert info["header"]["codec"]["sink"] == 4 and rep["sink"] == 4  # the default attention sink
    assert info["ratio_vs_fp16"] == pytest.approx(2 * info["channels"] / info["file_bytes"])
    r = run("inspect", d / "c.csr")
    assert r.exit_code == 0 and "checksum  ok" in r.stdout and "vs fp16" in r.stdout
    r = run("decompress", d / "c.csr", "--dicts", dicts, "-o", d / "back.pt")
    assert r.exit_code == 0, r.output
    back, orig = load_cache(d / "back.pt"), load_cache(cache_path)
    assert back.meta == orig.meta
    for a, b in zip(back.keys + back.values, orig.keys + orig.values):
        assert a.shape == b.shape and torch.equal(a[:, :, -4:], b[:, :, -4:])
        assert (a - b).norm() < b.norm()
    assert sorted(os.listdir(d)) == ["back.pt", "c.csr", "cache.pt", "dicts.safetensors", "rep.json"]  # no scratch left


def test_same_input_same_bytes_and_input_formats(files):
    d, dicts, cache_path = files
    cache = make_cache()
    torch.save(tuple((k, v) for k, v in zip(cache.keys, cache.values)), d / "legacy.pt")
    from safetensors.torch import save_file

    tensors = {f"{kind}.{i}": t for kind, ts in (("keys", cache.keys), ("values", cache.values)) for i, t in enumerate(ts)}
    save_file(tensors, str(d / "cache.safetensors"), metadata={"meta": json.dumps(cache.meta)})
    post = make_dicts(d / "post.safetensors", key_space="post-rope")
    outs = []
    for i, (src, dd) in enumerate([(cache_path, dicts), (cache_path, dicts), (d / "cache.safetensors", dicts), (d / "legacy.pt", post)]):
        r = run("compress", src, "--dicts", dd, "-o", d / f"o{i}.csr", "--sparsity", "2,1")
        assert r.exit_code == 0, r.output
        outs.append((d / f"o{i}.csr").read_bytes())
    assert outs[0] == outs[1] == outs[2]
    r = run("decompress", d / "o3.csr", "--dicts", post, "-o", d / "l.pt")
    assert r.exit_code == 0, r.output


def test_refusals_leave_everything_untouched(files):
    d, dicts, cache_path = files
    (d / "exists.csr").write_bytes(b"keep me")
    assert err_line(run("compress", cache_path, "--dicts", dicts, "-o", d / "exists.csr")) == f"error: {d / 'exists.csr'} already exists: pass --force to overwrite it"
    assert (d / "exists.csr").read_bytes() == b"keep me"
    assert err_line(run("compress", cache_path, "--dicts", dicts, "-o", d / "nope" / "c.csr")) == (
        f"error: output directory {d / 'nope'} does not exist: create it first (mkdir -p {d / 'nope'})"
    )
    r = run("compress", cache_path, "--dicts", dicts, "-o", d / "exists.csr", "--force", "--sparsity", "1")
    assert r.exit_code == 0 and (d / "exists.csr").read_bytes()[:4] == b"\x89CSR"
    assert err_line(run("compress", cache_path, "--dicts", dicts, "-o", d / "x.csr", "--bits", "1", "--sparsity", "2")) == "error: pass either --bits or --sparsity, not both"
    assert err_line(run("compress", cache_path, "--dicts", dicts, "-o", d / "x.csr", "--coef", "fp4")) == "error: coefficient format must be one of fp16, fp8, int8, int4, int3, or one for keys and one for values written keys/values (e.g. fp8/int3), got 'fp4'"


def test_bad_caches(files):
    d, dicts, _ = files
    bad = make_cache()
    bad.values[1][0, 0, 3, 2] = float("nan")
    save_cache(d / "nan.pt", bad)
    assert err_line(run("compress", d / "nan.pt", "--dicts", dicts, "-o", d / "x.csr")) == (
        f"error: {d / 'nan.pt'}: layer 1 contains NaN or Inf values; refusing to compress a broken cache"
    )
    torch.save({"keys": [], "values": [], "meta": {}}, d / "empty.pt")
    assert err_line(run("compress", d / "empty.pt", "--dicts", dicts, "-o", d / "x.csr")) == (
        f"error: {d / 'empty.pt'} is empty (no layers): save a cache with csrtool cache first"
    )
    torch.save({"weights": torch.zeros(2)}, d / "odd.pt")
    assert err_line(run("compress", d / "odd.pt", "--dicts", dicts, "-o", d / "x.csr")).startswith(
        f"error: {d / 'odd.pt'}: unknown cache layout (dict); expected csrtool's"
    )
    (d / "text.pt").write_text("hello")
    assert err_line(run("compress", d / "text.pt", "--dicts", dicts, "-o", d / "x.csr")).startswith(f"error: {d / 'text.pt'} is not a readable cache file")
    with open(d / "evil.pt", "wb") as fh:  # a pickle that would run code: must be refused, never executed
        pickle.dump(_Evil(), fh)
    torch.save({"keys": [_Evil()]}, d / "evil_zip.pt")
    for name in ("evil.pt", "evil_zip.pt"):
        msg = err_line(run("compress", d / name, "--dicts", dicts, "-o", d / "x.csr"))
        assert msg.startswith(f"error: {d / name} needs arbitrary unpickling to load, which csrtool refuses for safety"), msg
    assert not (d / "pwned").exists()
    assert not (d / "x.csr").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_dictionary_problems(files):
    d, dicts, cache_path = files
    assert run("compress", cache_path, "--dicts", dicts, "-o", d / "c.csr", "--sparsity", "2").exit_code == 0
    other = make_dicts(d / "other.safetensors", seed=9)
    from csrtool.formats.dicts import load_dicts

    fa, fb = load_dicts(dicts).fingerprint, load_dicts(other).fingerprint
    assert err_line(run("decompress", d / "c.csr", "--dicts", other, "-o", d / "b.pt")) == (
        f"error: dictionary mismatch: {d / 'c.csr'} was compressed with dictionary {fa[:16]}, the given one is {fb[:16]}: "
        "pass the dictionary file used by csrtool compress"
    )
    raw = bytearray(dicts.read_bytes())
    raw[-5] ^= 0x01  # modify one atom byte
    (d / "mod.safetensors").write_bytes(bytes(raw))
    assert err_line(run("decompress", d / "c.csr", "--dicts", d / "mod.safetensors", "-o", d / "b.pt")) == (
        f"error: {d / 'mod.safetensors'} was modified after training (fingerprint mismatch): re-run csrtool train-dict"
    )
    small = make_dicts(d / "small.safetensors", d=8)
    assert err_line(run("compress", cache_path, "--dicts", small, "-o", d / "x.csr")) == (
        "error: dictionary/cache shape mismatch: the cache's keys (layer 0) has head_dim 16 but the dictionary covers "
        "1 x 8 = 8 channels: use a dictionary trained for this model"
    )
    assert not (d / "b.pt").exists() and not (d / "x.csr").exists()


def test_corrupt_csr_via_cli(files):
    d, dicts, cache_path = files
    assert run("compress", cache_path, "--dicts", dicts, "-o", d / "c.csr", "--sparsity", "2").exit_code == 0
    raw = (d / "c.csr").read_bytes()
    (d / "t.csr").write_bytes(raw[:-7])
    assert err_line(run("inspect", d / "t.csr")) == f"error: {d / 't.csr'} is truncated (expected {len(raw)} bytes, found {len(raw) - 7}): compress the cache again"
    assert err_line(run("decompress", d / "t.csr", "--dicts", dicts, "-o", d / "b.pt")).endswith("compress the cache again")
    assert not (d / "b.pt").exists()


def test_decompressed_cache_drives_generate(tmp_path):
    """compress -> decompress gives a cache that model.generate(past_key_values=...) accepts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from csrtool.models import rope_info

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        dc = model(input_ids=ids, use_cache=True).past_key_values
    meta = {"model": "tiny-llama", "key_space": "post-rope", "rope": rope_info(model), "position_offset": 0}
    save_cache(tmp_path / "cache.pt", from_dynamic_cache(dc, meta))
    g = torch.Generator().manual_seed(1)
    atoms = {f"layer.{i}.{k}": torch.nn.functional.normalize(torch.randn(2, c, 64, 8 // c, generator=g), dim=-1)
             for i in range(2) for k, c in (("k", 1), ("v", 2))}
    save_dicts(tmp_path / "d.safetensors", atoms, {}, {"key_space": "pre-rope"}, {})
    r = run("compress", tmp_path / "cache.pt", "--dicts", tmp_path / "d.safetensors", "-o", tmp_path / "c.csr", "--sparsity", "4,2", "--window", "4")
    assert r.exit_code == 0, r.output
    r = run("decompress", tmp_path / "c.csr", "--dicts", tmp_path / "d.safetensors", "-o", tmp_path / "back.pt")
    assert r.exit_code == 0, r.output
    back = load_cache(tmp_path / "back.pt")
    orig = from_dynamic_cache(dc, meta)
    for x, y in zip(back.keys + back.values, orig.keys + orig.values):
        assert torch.equal(x[:, :, :4], y[:, :, :4]) and torch.equal(x[:, :, -4:], y[:, :, -4:])  # sink and window verbatim
        assert 0 < float((x - y).pow(2).sum() / y.pow(2).sum()) < 0.5  # the middle is coded: close, not exact
    nxt = torch.randint(0, 64, (1, 1))
    with torch.no_grad():
        gen = model.generate(input_ids=torch.cat([ids, nxt], dim=1), past_key_values=to_dynamic_cache(back),
                             max_new_tokens=3, do_sample=False)
        # generate continued from the decompressed cache: the same tokens as a greedy loop over it
        cache, tok, want = to_dynamic_cache(back), nxt, []
        for _ in range(3):
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            want.append(int(tok))
    assert gen.shape == (1, 24) and gen[0, -3:].tolist() == want
