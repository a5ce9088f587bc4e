"""collect / cache: tiny random Llama, Qwen2, Gemma 3 models, built offline."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from csrtool.formats.acts import ActsReader
from csrtool.cli import app
from csrtool.collect import capture_kv, tokenize
from csrtool.engine import rope
from csrtool.errors import CsrError
from csrtool.formats.io import parse_layers
from csrtool.formats.kvcache import load_cache
from csrtool.models import load_model, rope_info
from tiny import tiny_model

runner = CliRunner()
TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # ~1.8k byte tokens


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_collect_writes_shards_per_layer_and_head(tiny_model_dirs, tmp_path, text_file, arch):
    out = tmp_path / "acts"
    res = runner.invoke(app, ["collect", "-m", str(tiny_model_dirs[arch]), "-t", str(text_file),
                              "--max-tokens", "300", "--seq-len", "128", "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    reader = ActsReader(out)
    assert reader.tokens == 300 and reader.layers == [0, 1]
    assert (reader.num_kv_heads, reader.head_dim) == (2, 8)
    k = reader.load(1, "k")
    assert k.shape == (300, 2, 8) and torch.isfinite(k).all()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokens"] == 300 and report["tokens_per_s"] > 0
    # the default --keys auto codes keys before RoPE where the model allows it (every one here, Gemma 3 with its per-layer rotations)
    assert reader.manifest["key_space"] == "pre-rope"
    assert ("layers" in reader.manifest["rope"]) == (arch == "gemma3")


def test_collect_matches_a_direct_forward_pass(tiny_llama_dir, tmp_path, text_file):
    out = tmp_path / "acts"
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(text_file),
                              "--max-tokens", "100", "--seq-len", "100", "--keys", "post-rope", "-o", str(out)])
    assert res.exit_code == 0, res.output
    loaded = load_model(str(tiny_llama_dir))
    ids = tokenize(loaded.tokenizer, TEXT)[:100][None]
    keys, values = capture_kv(loaded.model, ids)
    reader = ActsReader(out)
    # stored as fp16: compare at fp16 precision
    assert torch.allclose(reader.load(0, "v"), values[0][0].transpose(0, 1).half().float())
    assert torch.allclose(reader.load(1, "k"), keys[1][0].transpose(0, 1).half().float())


def test_capture_runs_the_head_on_the_last_position_only_and_keeps_the_cache_exact(tiny_llama_dir):
    from transformers import DynamicCache

    from csrtool.models import last_logits

    loaded = load_model(str(tiny_llama_dir))
    assert last_logits(loaded.model) == {"logits_to_keep": 1}
    assert last_logits(torch.nn.Linear(2, 2)) == {}  # a forward without the argument: the plain call
    ids = tokenize(loaded.tokenizer, TEXT)[:40][None]
    with torch.no_grad():
        full = loaded.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        last = loaded.model(input_ids=ids, use_cache=False, **last_logits(loaded.model))
    assert full.logits.shape[1] == 40 and last.logits.shape[1] == 1
    torch.testing.assert_close(last.logits[0, -1], full.logits[0, -1])
    keys, values = capture_kv(loaded.model, ids)
    for i, layer in enumerate(full.past_key_values.layers):
        assert torch.equal(keys[i], layer.keys) and torch.equal(values[i], layer.values)


def test_shards_flush_and_concatenate(tiny_llama_dir, tmp_path, text_file):
    from csrtool.collect import CollectConfig, collect

    loaded = load_model(str(tiny_llama_dir))
    cfg = CollectConfig(max_tokens=250, seq_len=50, shard_tokens=100)
    manifest = collect(loaded, TEXT, tmp_path / "acts", cfg, "test")
    assert len(manifest["shards"]) == 3  # 100 + 100 + 50
    shard0 = load_file(str(tmp_path / "acts" / manifest["shards"][0]))
    assert shard0["layer.0.k"].shape == (100, 2, 8)
    assert ActsReader(tmp_path / "acts").load(0, "k").shape == (250, 2, 8)


def test_pre_rope_keys_equal_the_key_projection(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    model = loaded.model
    ids = torch.arange(3, 60)[None]
    captured = {}
    attn = model.model.layers[1].self_attn
    handle = attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))
    try:
        pre, _ = capture_kv(model, ids, "pre-rope", rope_info(model))
    finally:
        handle.remove()
    direct = captured["k"].view(1, ids.shape[1], 2, 8).transpose(1, 2)  # [B, H, T, D]
    assert torch.allclose(pre[1], direct, atol=1e-5)
    post, _ = capture_kv(model, ids)
    info = rope_info(model)
    again = rope.rotate(pre[1], torch.arange(ids.shape[1]), torch.tensor(info["inv_freq"]), info["scaling"])
    assert torch.allclose(again, post[1], atol=1e-5)


def test_gemma3_rope_info_lists_the_full_layer_rotation():
    """Tiny Gemma 3: layer 0 slides (theta 10,000), layer 1 is full (theta 1,000,000): one common rotation, one override."""
    model = tiny_model("gemma3")
    info = rope_info(model)
    d = 8
    sliding = [10_000.0 ** (-i / d) for i in range(0, d, 2)]
    full = [1_000_000.0 ** (-i / d) for i in range(0, d, 2)]
    assert info["inv_freq"] == pytest.approx(sliding) and info["scaling"] == 1.0
    assert [r["layer"] for r in info["layers"]] == [1]
    assert info["layers"][0]["inv_freq"] == pytest.approx(full) and info["layers"][0]["scaling"] == 1.0
    assert "layers" not in rope_info(tiny_model("llama"))  # one rotation for every layer: today's dict


def test_gemma3_pre_rope_keys_equal_the_normed_keys_per_layer():
    """Gemma 3 normalises keys (k_norm) before RoPE: rotating the cached keys back with each layer's own
    rotation gives exactly k_norm's output; the common rotation would not on the full layer."""
    model = tiny_model("gemma3")
    ids = torch.arange(3, 60)[None]
    captured = {}
    hooks = [model.model.layers[i].self_attn.k_norm.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o))
             for i in range(2)]
    try:
        pre, _ = capture_kv(model, ids, "pre-rope", rope_info(model))
    finally:
        for h in hooks:
            h.remove()
    for i in range(2):
        assert captured[i].shape == pre[i].shape == (1, 2, ids.shape[1], 8)  # k_norm runs on [B, H, T, D]
        assert torch.allclose(pre[i], captured[i], atol=1e-5), i
    post, _ = capture_kv(model, ids)
    common = torch.tensor(rope_info(model)["inv_freq"])
    wrong = rope.unrotate(post[1], torch.arange(ids.shape[1]), common)
    assert not torch.allclose(wrong, captured[1], atol=1e-2)


def test_gemma3_collect_pre_rope_records_the_per_layer_rotation(tiny_model_dirs, tmp_path, text_file):
    res = runner.invoke(app, ["collect", "-m", str(tiny_model_dirs["gemma3"]), "-t", str(text_file),
                              "--max-tokens", "64", "--keys", "pre-rope", "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    reader = ActsReader(tmp_path / "a")
    assert reader.manifest["key_space"] == "pre-rope"
    assert reader.manifest["rope"] == rope_info(load_model(str(tiny_model_dirs["gemma3"])).model)


def test_cache_command_writes_weights_only_loadable_dict(tiny_llama_dir, tmp_path):
    out = tmp_path / "c.pt"
    res = runner.invoke(app, ["cache", "-m", str(tiny_llama_dir), "--prompt", TEXT, "--max-tokens", "77", "-o", str(out)])
    assert res.exit_code == 0, res.output
    raw = torch.load(out, weights_only=True)
    assert set(raw) == {"keys", "values", "meta"}
    assert len(raw["keys"]) == 2 and raw["keys"][0].shape == (1, 2, 77, 8)
    kv = load_cache(out)
    assert kv.meta["tokens"] == 77 and kv.meta["key_space"] == "post-rope"
    assert len(kv.meta["rope"]["inv_freq"]) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "0"], "--max-tokens must be positive, got 0"),
        (["-m", "/nonexistent/model"], "model path /nonexistent/model does not exist"),
        (["-t", "/nonexistent.txt"], "text file /nonexistent.txt not found"),
        (["--layers", "5"], "layer 5 in '5' is out of range: the model has 2 layers (0-1)"),
        (["--keys", "sideways"], "--keys 'sideways' is not one of auto, post-rope, pre-rope"),
        (["--max-tokens", "100000"], "fewer than --max-tokens 100000"),
    ],
)
def test_collect_bad_input_is_one_clear_line(tiny_llama_dir, tmp_path, text_file, args, message):
    base = ["collect", "-m", str(tiny_llama_dir), "-t", str(text_file), "-o", str(tmp_path / "acts")]
    res = runner.invoke(app, base + args)
    assert res.exit_code == 1
    assert message in res.stderr
    assert "Traceback" not in res.output


def test_unreadable_text_and_existing_output(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(bad), "-o", str(tmp_path / "a")])
    assert res.exit_code == 1 and "is not UTF-8 text" in res.stderr
    (tmp_path / "exists").mkdir()
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-o", str(tmp_path / "exists")])
    assert res.exit_code == 1 and "already exists: pass --force" in res.stderr
    res = runner.invoke(app, ["cache", "-m", str(tiny_llama_dir), "-o", str(tmp_path / "a.pt")])
    assert res.exit_code == 1 and "give exactly one of --prompt" in res.stderr


def test_parse_layers():
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert parse_layers("0-1,3", 4) == [0, 1, 3]
    assert parse_layers("-1", 4) == [3]
    assert parse_layers("-2--1", 4) == [2, 3]
    with pytest.raises(CsrError, match="bad layer spec"):
        parse_layers("a-b", 4)


def test_builtin_corpus_split_is_disjoint_and_deterministic():
    from csrtool.corpus import builtin_text

    cal, held = builtin_text("calibration"), builtin_text("heldout")
    assert len(cal) > 300_000 and len(held) > 20_000
    assert builtin_text("heldout") == held
    assert held[:2000] not in cal


def test_version_and_help():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("csrtool ")
    res = runner.invoke(app, ["--help"])
    assert "collect" in res.stdout and "cache" in res.stdout


def test_gpt2_style_model_captures_and_refuses_pre_rope():
    from transformers import GPT2Config, GPT2LMHeadModel

    from csrtool.collect import key_rope

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, eos_token_id=0, bos_token_id=0)).eval()
    keys, values = capture_kv(model, torch.arange(20)[None])
    assert len(keys) == 2 and keys[0].shape == values[1].shape == (1, 4, 20, 8)
    with pytest.raises(CsrError, match="--keys pre-rope is not supported for gpt2 models"):
        key_rope(model, "pre-rope")


def test_force_refuses_to_delete_an_unrelated_directory(tiny_llama_dir, tmp_path, text_file):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("data")
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(text_file), "--max-tokens", "32",
                              "-o", str(precious), "--force"])
    assert res.exit_code == 1
    assert "is not empty and not a csrtool activation directory" in res.stderr
    assert (precious / "keep.txt").read_text() == "data"
    out = tmp_path / "acts"
    for _ in range(2):  # a second --force run replaces the first collection
        res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(text_file), "--max-tokens", "32",
                                  "-o", str(out), "--force"])
        assert res.exit_code == 0, res.output
    assert ActsReader(out).tokens == 32


def test_default_token_count_keeps_the_probe_and_explicit_counts_are_strict(tiny_llama_dir, tmp_path, text_file):
    """Without --max-tokens collect takes up to 32,768 tokens and leaves up to 512 after them for
    train-dict's calibration probe, taking fewer from a shorter text; --max-tokens N stays exact."""
    from csrtool.collect import DEFAULT_TOKENS, PROBE_TOKENS, CollectConfig, collect, tokens_to_collect

    assert DEFAULT_TOKENS == 32768
    assert tokens_to_collect(None, 100_000) == 32768 and tokens_to_collect(None, 32768 + 512) == 32768
    assert tokens_to_collect(None, 20_000) == 20_000 - PROBE_TOKENS and tokens_to_collect(None, 600) == 300
    assert tokens_to_collect(300, 20_000) == 300
    with pytest.raises(CsrError, match="fewer than --max-tokens 400"):
        tokens_to_collect(400, 399)
    loaded = load_model(str(tiny_llama_dir))
    n = tokenize(loaded.tokenizer, TEXT).numel()
    manifest = collect(loaded, TEXT, tmp_path / "acts", CollectConfig(seq_len=512, layers=(0,)), "test")
    assert manifest["tokens"] == n - PROBE_TOKENS and len(manifest["probe_ids"]) == PROBE_TOKENS
    assert ActsReader(tmp_path / "acts").load(0, "k").shape == (n - PROBE_TOKENS, 2, 8)
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(text_file), "-o", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert ActsReader(tmp_path / "cli").tokens == n - PROBE_TOKENS
