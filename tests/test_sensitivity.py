"""Layer sensitivity (csrtool.calibration.sensitivity), calibration in train-dict, per-layer sparsity in compress."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from csrtool import codec
from csrtool.formats import csrfile
from csrtool.cli import app
from csrtool.formats.dicts import load_dicts
from csrtool.eval.methods import Identity, NoiseMethod
from csrtool.models import load_model
from csrtool.calibration.sensitivity import _mixed_attention, _Replay, layer_sensitivity

runner = CliRunner()
TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # ~1.8k byte tokens


class _Module:
    scaling = 0.5


def reference_attention(q, k, v, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)


def test_mixed_attention_is_plain_attention_when_nothing_is_far():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    junk = (torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g))
    out, _ = _mixed_attention(_Module(), q, k, v, None, coded=junk, recent=6, sink=0)
    torch.testing.assert_close(out, reference_attention(q, k, v, 0.5))
    out, _ = _mixed_attention(_Module(), q, k, v, None, coded=(k, v), recent=0, sink=0, scaling=0.25)
    torch.testing.assert_close(out, reference_attention(q, k, v, 0.25))


def test_mixed_attention_uses_coded_tokens_only_far_back():
    # one head, 3 tokens, recent=1, sink=0: query i sees its own token exactly and older tokens coded
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]]).transpose(1, 2)  # [1, 1, 3, 2]
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]])
    k_hat, v_hat = torch.zeros_like(k), -v
    out, _ = _mixed_attention(_Module(), q, k, v, None, coded=(k_hat, v_hat), recent=1, sink=0, scaling=1.0)
    # token 1: logits [q1.k_hat0 = 0, q1.k1 = 1] -> p = softmax([0, 1]); value mix of -v0 and v1
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(out[0, 1, 0], p[0] * -v[0, 0, 0] + p[1] * v[0, 0, 1])
    # token 2: logits [0, 0, q2.k2 = 2]
    p = torch.softmax(torch.tensor([0.0, 0.0, 2.0]), 0)
    torch.testing.assert_close(out[0, 2, 0], p[0] * -v[0, 0, 0] + p[1] * -v[0, 0, 1] + p[2] * v[0, 0, 2])
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])
    # with sink=1 token 0 stays exact for everyone
    out, _ = _mixed_attention(_Module(), q, k, v, None, coded=(k_hat, v_hat), recent=1, sink=1, scaling=1.0)
    p = torch.softmax(torch.tensor([1.0, 0.0, 2.0]), 0)
    torch.testing.assert_close(out[0, 2, 0], p[0] * v[0, 0, 0] + p[1] * -v[0, 0, 1] + p[2] * v[0, 0, 2])


def test_layer_sensitivity_zero_for_exact_and_grows_with_noise(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    ids = torch.randint(0, 250, (1, 48), generator=torch.Generator().manual_seed(0))
    impl = loaded.model.config._attn_implementation
    exact = layer_sensitivity(loaded.model, ids, Identity(), recent=4, sink=2)
    assert sorted(exact) == [(0, "k"), (0, "v"), (1, "k"), (1, "v")]
    floor = max(exact.values())
    assert floor < 1e-7  # eager mixed attention vs sdpa: float32 rounding only
    small = layer_sensitivity(loaded.model, ids, NoiseMethod(0.01), recent=4, sink=2)
    large = layer_sensitivity(loaded.model, ids, NoiseMethod(100.0), recent=4, sink=2)
    for key in exact:
        assert large[key] > 20 * floor  # random weights: tiny logits, keys matter little but measurably
        if key[1] == "v":
            assert 10 * floor < small[key] < large[key] / 100
    assert loaded.model.config._attn_implementation == impl


class Halve:
    """A deterministic stand-in codec: every coded vector at half its size."""

    def reconstruct(self, layer, kind, x, positions, ids=None):
        return 0.5 * x


def test_replay_from_a_layer_matches_whole_passes(tiny_model_dirs):
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(1))
    for arch in ("llama", "qwen2"):
        model = load_model(str(tiny_model_dirs[arch])).model
        rerun = _Replay(model, ids)
        assert rerun.usable
        for layer in range(2):
            torch.testing.assert_close(rerun.run(layer), rerun.logits, rtol=1e-5, atol=1e-5)
        fast = layer_sensitivity(model, ids, Halve(), recent=3, sink=1)
        slow = layer_sensitivity(model, ids, Halve(), recent=3, sink=1, replay=False)
        assert fast == pytest.approx(slow, rel=1e-4, abs=1e-9)
        assert max(fast.values()) > 1e-7


@pytest.fixture(scope="module")
def pipeline(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    (d / "text.txt").write_text(TEXT)
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(d / "text.txt"), "--max-tokens", "600",
                              "--seq-len", "200", "--keys", "pre-rope", "-o", str(d / "acts")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train-dict", str(d / "acts"), "-o", str(d / "dicts.safetensors"), "--atoms", "16",
                              "--epochs", "0", "--no-predictor", "--json", str(d / "train.json")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cache", "-m", str(tiny_llama_dir), "--prompt", TEXT, "--max-tokens", "120", "-o", str(d / "cache.pt")])
    assert res.exit_code == 0, res.output
    return d


def test_collect_keeps_a_held_out_probe_window(pipeline):
    manifest = json.loads((pipeline / "acts" / "manifest.json").read_text())
    assert manifest["tokens"] == 600 and len(manifest["probe_ids"]) == 200


def test_train_dict_stores_calibrated_curves(pipeline):
    ds = load_dicts(pipeline / "dicts.safetensors")
    sens = ds.sensitivity
    assert sens["s_ref"] == [1, 1] and sens["tokens"] == 200 and sens["sink"] == 4
    assert sorted(sens["kl"]) == ["layer.0.k", "layer.0.v", "layer.1.k", "layer.1.v"]
    assert all(v >= 0 for v in sens["kl"].values()) and sens["kl"]["layer.0.v"] > 0
    for name, curve in sens["curves"].items():
        assert len(curve) == 4  # head_dim 8: up to 4 atoms per vector
        assert curve[0] == pytest.approx(sens["kl"][name])  # measured at s_ref = 1
        assert curve[-1] <= curve[0]
    report = json.loads((pipeline / "train.json").read_text())
    assert report["sensitivity"]["kl"] == sens["kl"] and "curves" not in report["sensitivity"]


def test_compress_spends_bits_per_layer(pipeline):
    d, dicts = pipeline, pipeline / "dicts.safetensors"
    res = runner.invoke(app, ["compress", str(d / "cache.pt"), "-d", str(dicts), "--bits", "4", "--fixed", "--coef", "fp8", "-o", str(d / "a.csr"), "--json", str(d / "a.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((d / "a.json").read_text())
    plan = [tuple(p) for p in rep["layer_sparsity"]]
    assert len(plan) == 2 and rep["code_bits_per_channel"]["avg"] <= 4.0
    header = csrfile.open_csr(d / "a.csr").header
    assert header.version == 2 and header.config.layer_sparsity == tuple(plan)
    res = runner.invoke(app, ["compress", str(d / "cache.pt"), "-d", str(dicts), "--bits", "4", "--uniform", "--fixed", "--coef", "fp8", "-o", str(d / "u.csr"), "--json", str(d / "u.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((d / "u.json").read_text())["layer_sparsity"] is None
    assert csrfile.open_csr(d / "u.csr").header.version == 1
    # both decode; each coded layer is what its own sparsity gives: a uniform file at that
    # layer's (s_k, s_v) decodes to the same tensors for that layer
    ds = load_dicts(dicts)
    a, u = csrfile.read_csr(d / "a.csr", ds), csrfile.read_csr(d / "u.csr", ds)
    uniform = csrfile.open_csr(d / "u.csr").header.config
    assert any(p != (uniform.sparsity_k, uniform.sparsity_v) for p in plan)  # calibration moved atoms
    for layer, (s_k, s_v) in enumerate(plan):
        res = runner.invoke(app, ["compress", str(d / "cache.pt"), "-d", str(dicts), "--sparsity", f"{s_k},{s_v}", "--fixed", "--coef", "fp8", "-o", str(d / f"s{layer}.csr")])
        assert res.exit_code == 0, res.output
        s = csrfile.read_csr(d / f"s{layer}.csr", ds)
        assert torch.equal(a.keys[layer], s.keys[layer]) and torch.equal(a.values[layer], s.values[layer])
        if (s_k, s_v) != (uniform.sparsity_k, uniform.sparsity_v):
            assert not (torch.equal(a.keys[layer], u.keys[layer]) and torch.equal(a.values[layer], u.values[layer]))


def test_train_dict_no_calibrate(pipeline, tmp_path):
    res = runner.invoke(app, ["train-dict", str(pipeline / "acts"), "-o", str(tmp_path / "d.safetensors"), "--atoms", "16",
                              "--epochs", "0", "--no-calibrate"])
    assert res.exit_code == 0, res.output
    assert load_dicts(tmp_path / "d.safetensors").sensitivity == {}


def test_eval_uses_the_calibrated_plan_unless_uniform(pipeline, tiny_llama_dir):
    from csrtool.calibration import allocate

    dicts = pipeline / "dicts.safetensors"
    plans = {}
    for flag in ([], ["--uniform"]):
        out = pipeline / f"eval{len(flag)}.json"
        res = runner.invoke(app, ["eval", "--model", str(tiny_llama_dir), "--dicts", str(dicts), "--text", str(pipeline / "text.txt"),
                                  "--tokens", "120", "--chunk", "32", "--window", "16", "--bits", "4", "--methods", "omp",
                                  "--baselines", "", "--no-needle", "--json", str(out)] + flag)
        assert res.exit_code == 0, res.output
        (m,) = [m for m in json.loads(out.read_text())["methods"] if m["name"] == "csr-omp-4b"]
        plans[bool(flag)] = m["config"]["layer_sparsity"]
        assert m["bits_per_channel"] <= 4.0
    ds = load_dicts(dicts)
    want = allocate.plan(ds.sensitivity, 2, 4.0, ds.n_atoms, 8, 1, codec.DEFAULT_COEF)
    assert [tuple(p) for p in plans[False]] == list(want) and plans[True] is None


def test_calibration_needs_a_loadable_model(pipeline, tmp_path):
    import shutil

    acts = tmp_path / "acts"
    shutil.copytree(pipeline / "acts", acts)
    manifest = json.loads((acts / "manifest.json").read_text())
    manifest["model"] = str(tmp_path / "gone")
    (acts / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "d.safetensors"
    res = runner.invoke(app, ["train-dict", str(acts), "-o", str(out), "--atoms", "16", "--epochs", "0", "--scope", "head"])
    assert res.exit_code == 1 and not out.exists()  # the default token predictor needs the model first
    assert "cannot load" in res.output and "--no-predictor" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train-dict", str(acts), "-o", str(out), "--atoms", "16", "--epochs", "0", "--scope", "head", "--no-predictor"])
    assert res.exit_code == 1 and not out.exists()
    assert "cannot load" in res.output and "re-run with --no-calibrate" in res.output
    res = runner.invoke(app, ["train-dict", str(acts), "-o", str(out), "--atoms", "16", "--epochs", "0", "--scope", "head", "--no-calibrate",
                              "--no-predictor"])
    assert res.exit_code == 0, res.output
    assert "trained 0, resumed 8" in res.output and load_dicts(out).sensitivity == {}
