"""The eval runner, methods and CLI on a tiny random Llama built offline."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from csrtool import codec
from csrtool.cli import app
from csrtool.formats.dicts import DictSet, save_dicts
from csrtool.eval import needle, pq, runner, suite
from csrtool.eval.bootstrap import Resampler
from csrtool.errors import CsrError
from csrtool.eval.csr import CSR
from csrtool.eval.methods import Identity, NoiseMethod
from csrtool.eval.quanto import QuantizedCacheMethod
from csrtool.models import rope_info
from tiny import byte_tokenizer, tiny_model

CHUNK, WINDOW, T = 32, 16, 160


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (1, T), generator=g)


@pytest.fixture(scope="module")
def ref(model, ids):
    return runner.reference_pass(model, ids, CHUNK)


def tiny_dicts(key_space="post-rope", n=64, seed=0) -> DictSet:
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        a = torch.randn(*shape, generator=g)
        return a / a.norm(dim=-1, keepdim=True)

    atoms = {}
    for layer in range(2):
        atoms[f"layer.{layer}.k"] = unit(1, 1, n, 8)
        atoms[f"layer.{layer}.v"] = unit(2, 2, n, 4)  # per-head value dictionaries, split in 2
    return DictSet(atoms=atoms, source={"key_space": key_space})


class Recorder:
    """Scales vectors by 0.9 and records which positions it was asked to compress."""

    name, bits_k, bits_v, side_bits = "recorder", 0.0, 0.0, 0

    def __init__(self):
        self.seen = {}

    def reconstruct(self, layer, kind, x, positions, ids=None):
        self.seen.setdefault((layer, kind), []).extend(positions.tolist())
        return 0.9 * x


def test_reference_matches_plain_teacher_forcing(model, ids, ref):
    with torch.no_grad():
        logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[CHUNK:-1].double(), ids[0, CHUNK + 1 :], reduction="sum")
    assert ref.targets.numel() == T - 1 - CHUNK
    assert ref.ppl == pytest.approx(math.exp(float(nll) / (T - 1 - CHUNK)), rel=1e-5)


def test_identity_is_exact(model, ids, ref):
    res = runner.method_pass(model, ids, Identity(), ref, CHUNK, WINDOW)
    assert res.ppl == pytest.approx(ref.ppl, rel=1e-9)
    assert res.kl == pytest.approx(0.0, abs=1e-9)
    assert res.top1 == 1.0
    assert res.recon[(0, "k")].rel_err == 0.0 and res.recon[(1, "v")].cos == pytest.approx(1.0)
    assert res.attn[0].value == 0.0 and res.attn[1].value == 0.0


def test_each_token_compressed_once_outside_window(model, ids, ref):
    rec = Recorder()
    runner.method_pass(model, ids, rec, ref, CHUNK, WINDOW)
    # after the last chunk the cache holds T tokens; all but the last WINDOW were compressed exactly once
    for layer in range(2):
        for kind in "kv":
            assert sorted(rec.seen[(layer, kind)]) == list(range(T - WINDOW))


def test_sink_tokens_never_compressed(model, ids, ref):
    rec = Recorder()
    res = runner.method_pass(model, ids, rec, ref, CHUNK, WINDOW, sink=3)
    for layer in range(2):
        for kind in "kv":
            assert sorted(rec.seen[(layer, kind)]) == list(range(3, T - WINDOW))
    # attention error still compares against the exact cache (sink included): same as recomputing without a sink
    assert res.attn[0].value > 0.0
    same = runner.method_pass(model, ids, NoiseMethod(1.0), ref, CHUNK, WINDOW, sink=T)
    assert same.kl == pytest.approx(0.0, abs=1e-9) and not same.recon


def test_degraded_method_is_worse(model, ids, ref):
    res = runner.method_pass(model, ids, NoiseMethod(1.0, seed=3), ref, CHUNK, WINDOW)
    mild = runner.method_pass(model, ids, NoiseMethod(0.001, seed=3), ref, CHUNK, WINDOW)
    assert res.kl > 10 * mild.kl > 0.0  # a random model is nearly uniform: KLs are small but ordered
    assert res.top1 < mild.top1 <= 1.0
    assert res.nll > ref.nll
    assert 0.7 < res.recon[(0, "k")].rel_err < 1.3  # noise of the signal's power
    assert res.attn[0].value > 1e-3
    # a window covering everything compresses nothing
    same = runner.method_pass(model, ids, NoiseMethod(1.0), ref, CHUNK, T)
    assert same.kl == pytest.approx(0.0, abs=1e-9) and not same.recon


def test_attention_error_hand_computed_layer0(model, ids, ref):
    """Layer 0 sees the same inputs in every pass: recompute its attention error directly."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rec = Recorder()
    res = runner.method_pass(model, ids, rec, ref, CHUNK, WINDOW)
    cfg = model.config
    hd, nq, nkv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        attn = model.model.layers[0].self_attn
        x = model.model.layers[0].input_layernorm(h)
        pos = torch.arange(T)[None]
        cos, sin = model.model.rotary_emb(h, pos)
        q = attn.q_proj(x).view(1, T, nq, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, T, nkv, hd).transpose(1, 2)
        v = attn.v_proj(x).view(1, T, nkv, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k, v = q.double(), k.double().repeat_interleave(nq // nkv, 1), v.double().repeat_interleave(nq // nkv, 1)

    def attend(qc, kk, vv, start):
        n = qc.shape[2]
        scores = qc @ kk.transpose(-1, -2) * hd**-0.5  # [1, Hq, n, S]
        mask = torch.arange(kk.shape[2])[None, :] > (start + torch.arange(n))[:, None]
        return torch.softmax(scores.masked_fill(mask, -math.inf), -1) @ vv

    err = energy = 0.0
    for start in range(CHUNK, T, CHUNK):  # chunks that see compressed tokens: [0, start - WINDOW)
        end = min(T, start + CHUNK)
        c = start - WINDOW
        kk, vv = k[:, :, :end].clone(), v[:, :, :end].clone()
        exact = attend(q[:, :, start:end], kk, vv, start)
        kk[:, :, :c] *= 0.9
        vv[:, :, :c] *= 0.9
        got = attend(q[:, :, start:end], kk, vv, start)
        err += float(((got - exact) ** 2).sum())
        energy += float((exact**2).sum())
    assert res.attn[0].value == pytest.approx(err / energy, rel=1e-3)


def test_csr_method_matches_codec(model, ids, ref):
    ds = tiny_dicts()
    csr = CSR(ds, 2, 2, 8, bits=8.0, method="mp", coef="fp8")
    s_k, s_v = codec.choose_sparsity(8.0, 64, 8, 2, "fp8")
    assert (csr.s_k, csr.s_v) == (s_k, s_v)
    assert (csr.bits_k + csr.bits_v) / 2 == pytest.approx(codec.bits_per_channel(64, 8, s_k, s_v, 2, "fp8"))
    x = torch.randn(1, 2, 20, 8)
    torch.testing.assert_close(csr.reconstruct(1, "v", x, torch.arange(20)), codec.roundtrip(x, ds.get(1, "v"), s_v, "fp8", "mp"))
    res = runner.method_pass(model, ids, csr, ref, CHUNK, WINDOW)
    assert 0.0 < res.recon[(0, "k")].rel_err < 1.0 and res.kl > 0.0
    # pre-RoPE dictionaries: keys are unrotated at their positions, coded, rotated back
    pre = CSR(tiny_dicts("pre-rope"), 2, 2, 8, bits=8.0, method="omp", rope_info=rope_info(model))
    got = pre.reconstruct(0, "k", x, torch.arange(40, 60))
    want = codec.roundtrip_keys(x, pre.dicts.get(0, "k"), pre.s_k, "fp8", "omp", positions_offset=40, rope_info=rope_info(model))
    torch.testing.assert_close(got, want)


def test_pq_and_transformers_cache_methods(model, ids, ref):
    with pytest.raises(CsrError, match="at least .* calibration vectors per layer, got .*: raise --calib-tokens"):
        pq.ProductQuantizer(runner.collect_kv(model, ids[:, :96]), 4)
    calib = runner.collect_kv(model, ids)
    assert calib[(0, "k")].shape == (2 * T, 8)
    p = pq.ProductQuantizer(calib, 4)
    assert p.m == 4 and p.bits_k == 4.0 and p.side_bits == 4 * 256 * 8 * 16
    res = runner.method_pass(model, ids, p, ref, CHUNK, WINDOW)
    assert 0.0 < res.recon[(1, "v")].rel_err < 1.0
    with pytest.raises(CsrError, match="sub-vectors"):
        pq.subquantizers(1.5, 64)
    fp8 = runner.method_pass(model, ids, QuantizedCacheMethod("fp8", 8, WINDOW), ref, CHUNK, WINDOW)
    assert fp8.kl < 1e-2 and fp8.top1 > 0.9 and not fp8.recon


def test_needle_trials_and_retrieval(model):
    tok = byte_tokenizer()
    trials = needle.make_trials(tok, 100, (0.0, 1.0), seed=0)
    for tr in trials:
        text = tok.decode(tr.ids[0])
        assert f"The pass key is {tr.key}." in text and text.endswith(needle.QUESTION)
    assert tok.decode(trials[0].ids[0]).index(trials[0].key) < tok.decode(trials[1].ids[0]).index(trials[1].key)
    acc = needle.accuracy(model, tok, trials, Identity(), CHUNK, WINDOW)
    assert set(acc["by_depth"]) == {"0", "1"}
    # through an exact cache the chunked greedy answer is model.generate's greedy answer
    hits = 0
    for tr in trials:
        with torch.no_grad():
            gen = model.generate(input_ids=tr.ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        want = tok.decode(gen[0, tr.ids.shape[1]:].tolist(), skip_special_tokens=True)
        assert acc["answers"][f"{tr.depth:g}"] == want
        hits += tr.key in want
    assert acc["accuracy"] == hits / len(trials)
    # the prefill projects only the last position onto the vocabulary: the same next-token logits
    full, last = (runner.CompressedFeed(model, Identity(), window=WINDOW).step(trials[0].ids, last=flag) for flag in (False, True))
    assert full.shape[0] == trials[0].ids.shape[1] and last.shape[0] == 1
    torch.testing.assert_close(last[0], full[-1])


def test_run_eval_document(model, ids):
    cfg = suite.EvalConfig(bits=(8.0,), baselines=("fp16", "kivi2", "pq4", "quanto2"), solvers=("mp",), tokens=T,
                           chunk=CHUNK, window=WINDOW, needle=False)
    doc = suite.run_eval(model, ids, cfg, tiny_dicts(), calib_ids=ids, meta={"model": "tiny"})
    names = [m["name"] for m in doc["methods"]]
    quanto_ran = not any(s["name"] == "quanto2" for s in doc["skipped"])
    assert names[0].startswith("reference") and names[1:] == ["fp16", "kivi2", "pq4"] + ["quanto2"] * quanto_ran + ["csr-mp-8b"]
    for m in doc["methods"]:
        for key in ("name", "bits_per_channel", "ratio_vs_fp16", "ppl", "kl", "top1_agreement", "rel_err_k", "rel_err_v"):
            assert key in m
    kivi2 = doc["methods"][2]
    assert kivi2["bits_per_channel"] == 3.0 and len(kivi2["layers"]) == 2 and len(kivi2["layers"][0]["heads_k"]) == 2
    assert doc["config"]["tokens"] == T and doc["config"]["chunk"] == CHUNK and doc["config"]["window"] == WINDOW
    for m in doc["methods"][1:]:  # every row carries intervals covering its point
        ci = m["ci"]["ppl_increase"]
        assert ci["lo"] <= m["ppl_increase"] + 1e-12 and ci["hi"] >= m["ppl_increase"] - 1e-12
    assert "ratio_to_kivi2" in doc["methods"][-1]["ci"]


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def dicts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dicts") / "dicts.safetensors"
    ds = tiny_dicts()
    save_dicts(path, ds.atoms, {"n_atoms": 64}, {"key_space": "post-rope", "model": "tiny"}, {})
    return path


def test_cli_end_to_end(tiny_llama_dir, dicts_file, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    res = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_llama_dir), "--dicts", str(dicts_file), "--text", str(text), "--device", "cpu",
        "--tokens", "200", "--chunk", "32", "--window", "16", "--bits", "8", "--methods", "mp",
        "--baselines", "fp16,kivi2,pq,quanto2", "--calib-tokens", "200", "--needle-context", "64",
        "--json", str(out_json), "--plot", str(out_png),
    ])
    assert res.exit_code == 0, res.output
    assert "csr-mp-8b" in res.output and "kivi2" in res.output
    doc = json.loads(out_json.read_text())
    assert {m["name"] for m in doc["methods"]} >= {"fp16", "kivi2", "pq8", "csr-mp-8b"}
    assert doc["config"]["model"] == str(tiny_llama_dir) and doc["config"]["tokens"] == 200
    assert all("needle" in m for m in doc["methods"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baselines", "kivi7"], "unknown baseline"),
        (["--dicts", "/nonexistent/d.safetensors"], "not found"),
        (["--bits", "0.5"], "cannot be met"),
        (["--bits", "one"], "comma-separated"),
        (["--tokens", "20"], "--tokens"),
    ],
)
def test_cli_errors(tiny_llama_dir, dicts_file, args, message):
    base = ["eval", "--model", str(tiny_llama_dir), "--device", "cpu", "--no-needle", "--baselines", "kivi2", "--calib-tokens", "0"]
    if "--dicts" not in args:
        base += ["--dicts", str(dicts_file)]
    res = CliRunner().invoke(app, base + args)
    assert res.exit_code == 1, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_run_eval_fixed_and_adaptive_rows(model, ids):
    """--codes fixed,adaptive: both CSR rows at the same honest bits, each matching the codec it names."""
    cfg = suite.EvalConfig(bits=(8.0,), baselines=(), solvers=("omp",), tokens=T, chunk=CHUNK, window=WINDOW, needle=False,
                           codes=("fixed", "adaptive"))
    doc = suite.run_eval(model, ids, cfg, tiny_dicts(), calib_ids=ids, meta={"model": "tiny"})
    rows = {m["name"]: m for m in doc["methods"][1:]}
    assert list(rows) == ["csr-omp-8b-fixed", "csr-omp-8b"]  # the default code (adaptive) is named plainly
    fixed, adapt = rows["csr-omp-8b-fixed"], rows["csr-omp-8b"]
    assert suite.EvalConfig().codes == ("adaptive",)
    assert adapt["bits_per_channel"] == fixed["bits_per_channel"] <= 8.0
    assert adapt["rel_err_k"] != fixed["rel_err_k"]  # a different code, really run
    with pytest.raises(CsrError, match="--codes takes fixed and/or adaptive"):
        suite.EvalConfig(codes=("sometimes",))


def test_run_eval_pools_several_trainings(model, ids):
    """--dicts A --dicts B: a row per training, then the row pooled over them, whose interval draws the trainings;
    the bar judges the pooled row only (the best training would report its luck)."""
    cfg = suite.EvalConfig(bits=(8.0,), baselines=("kivi2",), solvers=("omp",), tokens=T, chunk=CHUNK, window=WINDOW, needle=False)
    sets = [tiny_dicts(seed=0), tiny_dicts(seed=1)]
    doc = suite.run_eval(model, ids, cfg, sets, meta={"model": "tiny"}, per_position=True)
    rows = {m["name"]: m for m in doc["methods"][1:]}
    assert list(rows) == ["kivi2", "csr-omp-8b:d1", "csr-omp-8b:d2", "csr-omp-8b"]
    one, two, pooled = rows["csr-omp-8b:d1"], rows["csr-omp-8b:d2"], rows["csr-omp-8b"]
    assert (one["run"], two["run"], pooled["runs"]) == (1, 2, 2) and "run" not in pooled
    # each run is the single-set eval of its dictionaries
    alone = suite.run_eval(model, ids, cfg, sets[1], meta={"model": "tiny"})
    assert two["ppl"] == pytest.approx(alone["methods"][-1]["ppl"], rel=1e-12) and two["ppl"] != one["ppl"]
    # the pooled row: mean log rise, mean KL, the costliest run's bits, intervals as bootstrap.pooled_increase
    assert pooled["ppl"] == pytest.approx(math.sqrt(one["ppl"] * two["ppl"]))
    assert pooled["kl"] == pytest.approx((one["kl"] + two["kl"]) / 2)
    assert pooled["bits_per_channel"] == max(one["bits_per_channel"], two["bits_per_channel"])
    pp = doc["per_position"]
    rs = Resampler([d["scored"] for d in pp["documents"]], seed=0)
    runs = [pp["methods"][n]["nll"] for n in ("csr-omp-8b:d1", "csr-omp-8b:d2")]
    assert pooled["ci"]["ppl_increase"] == rs.pooled_increase(pp["reference_nll"], runs, seed=1).as_dict()
    assert pooled["ci"]["ratio_to_kivi2"] == rs.pooled_ratio(pp["reference_nll"], runs, pp["methods"]["kivi2"]["nll"], seed=1).as_dict()
    assert "csr-omp-8b" not in pp["methods"]  # derived, not measured
    # the bar: a lucky training does not stand for the setting, its pooled row does
    lucky = [dict(r, bits_per_channel=1.0) for r in doc["methods"]]
    for r in lucky[2:]:
        r["ppl"] = {"csr-omp-8b:d1": 10.0, "csr-omp-8b:d2": 12.0, "csr-omp-8b": 11.0}[r["name"]]
    assert suite.bar(lucky)["two_bit"]["method"] == "csr-omp-8b"
    assert doc["documents"][0]["methods"]["csr-omp-8b"]["ppl_increase"] == pytest.approx(pooled["ppl_increase"])
    assert len(doc["config"]["dicts_fingerprint"]) == 2


def test_cli_several_dicts(tiny_llama_dir, dicts_file, tmp_path):
    other = tmp_path / "seed1.safetensors"
    save_dicts(other, tiny_dicts(seed=1).atoms, {"n_atoms": 64}, {"key_space": "post-rope", "model": "tiny"}, {})
    base = ["eval", "--model", str(tiny_llama_dir), "--device", "cpu", "--no-needle", "--baselines", "kivi2", "--calib-tokens", "0",
            "--tokens", "100", "--chunk", "32", "--window", "16", "--bits", "8", "--docs", "1"]
    out_json = tmp_path / "eval.json"
    res = CliRunner().invoke(app, base + ["--dicts", str(dicts_file), "--dicts", str(other), "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out_json.read_text())
    assert [m["name"] for m in doc["methods"][2:]] == ["csr-omp-8b:d1", "csr-omp-8b:d2", "csr-omp-8b"]
    assert doc["config"]["dicts"] == [str(dicts_file), str(other)] and len(set(doc["config"]["dicts_fingerprint"])) == 2
    assert "csr-omp-8b:d2" in res.output and "(pooled, 2 trainings)" in res.output
    res = CliRunner().invoke(app, base + ["--dicts", str(dicts_file), "--dicts", str(dicts_file)])
    assert res.exit_code == 1 and "given twice" in res.output and "Traceback" not in res.output
