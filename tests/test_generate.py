"""csrtool generate and CSRCache on a real model (slow) and the CLI on a tiny model (fast)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from csrtool.cli import app
from csrtool.formats.dicts import DictSet, save_dicts
from test_cache import tiny_dicts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dicts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dicts") / "dicts.safetensors"
    ds = tiny_dicts("pre-rope")
    save_dicts(path, ds.atoms, {"n_atoms": 64}, {"key_space": "pre-rope", "model": "tiny"}, {})
    return path


def test_cli_generate_tiny(tiny_llama_dir, dicts_file, tmp_path):
    out_json = tmp_path / "g.json"
    res = CliRunner().invoke(app, [
        "generate", "--model", str(tiny_llama_dir), "--dicts", str(dicts_file), "--device", "cpu", "--bits", "4",
        "--max-new-tokens", "20", "--block", "2", "--json", str(out_json), "hello there, tiny model",
    ])
    assert res.exit_code == 0, res.output
    doc = json.loads(out_json.read_text())
    assert doc["prompt_tokens"] == len("hello there, tiny model") and doc["new_tokens"] == 20
    held = doc["cache_bytes"]
    assert held["codes"] > 0 and held["total"] == held["codes"] + held["dense"]
    assert doc["dynamic_cache_bytes"] == 2 * 2 * 2 * (doc["prompt_tokens"] + 19) * 8 * 4  # K, V x 2 layers x 2 heads x D 8, float32
    assert doc["text"] and doc["text"] in res.stdout
    assert "decode" in res.stderr and "DynamicCache" in res.stderr


@pytest.mark.parametrize("args, message", [([], "pass a prompt"), (["hi", "--max-new-tokens", "0"], "--max-new-tokens"), (["hi", "--bits", "0.1"], "--bits")])
def test_cli_generate_errors(tiny_llama_dir, dicts_file, args, message):
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_llama_dir), "--dicts", str(dicts_file), "--device", "cpu", *args])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output


def _kmeans_dicts(loaded, n_atoms: int = 512) -> DictSet:
    """Per-layer dictionaries from the model's own pre-RoPE keys and values on the built-in corpus (k-means, quick)."""
    from csrtool.collect import capture_kv, tokenize
    from csrtool.corpus import builtin_text
    from csrtool.engine.kmeans import kmeans
    from csrtool.models import rope_info

    ids = tokenize(loaded.tokenizer, builtin_text("calibration"))[:1024][None]
    keys, values = capture_kv(loaded.model, ids, "pre-rope", rope_info(loaded.model))
    g = torch.Generator().manual_seed(0)
    atoms = {}
    for layer, (k, v) in enumerate(zip(keys, values)):
        for kind, x in (("k", k), ("v", v)):
            atoms[f"layer.{layer}.{kind}"] = kmeans(x[0].reshape(-1, x.shape[-1]).float(), n_atoms, iters=3, generator=g)[None, None]
    return DictSet(atoms=atoms, source={"key_space": "pre-rope"})


@pytest.mark.slow
def test_smollm2_first_greedy_tokens_match_uncompressed():
    from csrtool.cache import CSRCache
    from csrtool.errors import CsrError
    from csrtool.models import builtin_gguf, load_model

    try:
        builtin_gguf("smollm2-135m")
    except CsrError as exc:
        pytest.skip(str(exc))
    loaded = load_model("smollm2-135m", device="cpu")
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. The capital of Spain is"
    enc = loaded.tokenizer(prompt, return_tensors="pt")
    kw = dict(**enc, max_new_tokens=3, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id)
    plain = loaded.model.generate(**kw)
    with CSRCache.from_dicts(_kmeans_dicts(loaded), loaded.model, bits=2.0, block=1) as cache:
        out = loaded.model.generate(**kw, past_key_values=cache)
        assert cache.layers[0].k.tokens >= enc["input_ids"].shape[1] - 8  # the prompt is coded (window 4 + sink 4 kept)
    assert loaded.tokenizer.decode(out[0, -3:]) == loaded.tokenizer.decode(plain[0, -3:])
    assert "Madrid" in loaded.tokenizer.decode(out[0, -3:])


def test_cli_generate_resume_from_csr(tiny_llama_dir, tmp_path):
    """compress a prompt's cache, then `generate --resume` continues after its tokens."""
    from transformers import DynamicCache

    from csrtool import codec
    from csrtool.formats import csrfile
    from csrtool.formats.dicts import load_dicts
    from csrtool.formats.kvcache import KVCache
    from csrtool.models import load_model, rope_info

    d = tiny_dicts("pre-rope")
    atoms = {n: a if a.shape[0] == 2 else a.expand(2, *a.shape[1:]).clone() for n, a in d.atoms.items()}  # .csr: one scope
    dpath = tmp_path / "d.safetensors"
    save_dicts(dpath, atoms, {"n_atoms": 64}, {"key_space": "pre-rope", "model": "tiny"}, {})
    ds = load_dicts(dpath)
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    ids = loaded.tokenizer("a prompt that was compressed earlier", return_tensors="pt")["input_ids"]
    dyn = DynamicCache()
    with torch.no_grad():
        loaded.model(input_ids=ids, past_key_values=dyn, use_cache=True)
    kv = KVCache([x.keys for x in dyn.layers], [x.values for x in dyn.layers], {"key_space": "post-rope", "rope": rope_info(loaded.model)})
    header = csrfile.make_header(kv, ds, codec.CodecConfig(4, 2, "fp8", "omp", window=4, sink=4))
    path = tmp_path / "p.csr"
    csrfile.write_csr(path, header, csrfile.encode_sections(kv, ds, header))
    out_json = tmp_path / "g.json"
    res = CliRunner().invoke(app, [
        "generate", "--model", str(tiny_llama_dir), "--dicts", str(dpath), "--device", "cpu", "--resume", str(path),
        "--max-new-tokens", "6", "--json", str(out_json), ", and then",
    ])
    assert res.exit_code == 0, res.output
    doc = json.loads(out_json.read_text())
    assert doc["prompt_tokens"] == len(", and then") and doc["new_tokens"] == 6
    assert doc["dynamic_cache_bytes"] == 2 * 2 * 2 * (ids.shape[1] + len(", and then") + 5) * 8 * 4


def test_cli_generate_save_then_inspect_decompress_resume(tiny_llama_dir, tmp_path):
    """`generate --save` writes a .csr that inspect and decompress read and `generate --resume` continues;
    the file holds the prompt and every new token (the last one is run through the model before saving)."""
    from csrtool.formats.kvcache import load_cache
    from test_cache_save import file_dicts

    d = file_dicts("pre-rope", n=1024)
    dpath = tmp_path / "d.safetensors"
    save_dicts(dpath, d.atoms, {"n_atoms": 1024}, {"key_space": "pre-rope", "model": "tiny"}, {}, means=d.means)
    prompt, base = "a long prompt, compressed once and reused", ["--model", str(tiny_llama_dir), "--dicts", str(dpath), "--device", "cpu"]
    saved, first = tmp_path / "p.csr", tmp_path / "g1.json"
    res = CliRunner().invoke(app, ["generate", *base, "--bits", "4", "--max-new-tokens", "9", "--save", str(saved), "--json", str(first), prompt])
    assert res.exit_code == 0, res.output
    doc = json.loads(first.read_text())
    assert doc["saved"] == {"path": str(saved), "bytes": saved.stat().st_size, "tokens": len(prompt) + 9}
    assert "saved 50 tokens" in res.stderr
    res = CliRunner().invoke(app, ["generate", *base, "--max-new-tokens", "2", "--save", str(saved), "hi"])
    assert res.exit_code == 1 and "already exists" in res.output  # before any generation
    res = CliRunner().invoke(app, ["inspect", str(saved), "--json"])
    assert res.exit_code == 0, res.output
    header = json.loads(res.stdout)["header"]
    assert header["layers"][0] == [1, 2, len(prompt) + 9, 8, 8] and header["codec"]["key_space"] == "pre-rope"
    assert header["model"] == str(tiny_llama_dir) and header["rope"]["position_offset"] == 0
    res = CliRunner().invoke(app, ["decompress", str(saved), "--dicts", str(dpath), "-o", str(tmp_path / "kv.pt")])
    assert res.exit_code == 0, res.output
    assert load_cache(tmp_path / "kv.pt").keys[1].shape == (1, 2, len(prompt) + 9, 8)
    second = tmp_path / "g2.json"
    res = CliRunner().invoke(app, ["generate", *base, "--resume", str(saved), "--max-new-tokens", "4", "--json", str(second), " and then"])
    assert res.exit_code == 0, res.output
    doc = json.loads(second.read_text())
    assert doc["prompt_tokens"] == len(" and then") and doc["new_tokens"] == 4
    assert doc["dynamic_cache_bytes"] == 2 * 2 * 2 * (len(prompt) + 9 + len(" and then") + 3) * 8 * 4
