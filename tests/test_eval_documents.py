"""Several documents, pooled rows with intervals, and sliding-window layers, on tiny models built offline."""

import math

import pytest
import torch

from csrtool.errors import CsrError
from csrtool.eval import bootstrap, documents, runner, suite
from csrtool.eval.methods import Identity
from test_eval_runner import Recorder, tiny_dicts
from tiny import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heldout_documents_are_consecutive_windows():
    from csrtool.corpus import builtin_text

    tok = byte_tokenizer()
    docs = documents.heldout_documents(tok, 3, 100)
    stream = documents.token_ids(tok, builtin_text("heldout"), 300)[0]
    assert [d.tokens for d in docs] == [100, 100, 100]
    assert torch.equal(torch.cat([d.ids[0] for d in docs]), stream)
    assert docs[1].name == "heldout[100:200]"
    with pytest.raises(CsrError, match="use at most --docs"):
        documents.heldout_documents(tok, 10, 200_000)


def test_file_documents_one_per_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x" * 50)
    b.write_text("y" * 500)
    docs = documents.file_documents(byte_tokenizer(), [a, b], 100)
    assert [d.tokens for d in docs] == [50, 100] and docs[0].name == str(a)


def test_run_eval_pools_documents_and_recomputes_from_per_position():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(2)
    docs = [documents.Document(f"d{i}", torch.randint(0, 256, (1, 130 + 30 * i), generator=g)) for i in range(2)]
    cfg = suite.EvalConfig(bits=(8.0,), baselines=("kivi2", "kivi4"), solvers=("mp",), tokens=130, chunk=32, window=16, needle=False)
    doc = suite.run_eval(model, docs, cfg, tiny_dicts(), per_position=True, block=16)
    pp = doc["per_position"]
    assert [d["scored"] for d in pp["documents"]] == [130 - 33, 160 - 33]
    ref = torch.tensor(pp["reference_nll"], dtype=torch.float64)
    assert doc["reference_ppl"] == pytest.approx(math.exp(float(ref.mean())))
    rs = bootstrap.Resampler([d["scored"] for d in pp["documents"]], block=16, seed=cfg.seed)
    for row in doc["methods"][1:]:
        nll = torch.tensor(pp["methods"][row["name"]]["nll"], dtype=torch.float64)
        assert row["ppl"] == pytest.approx(math.exp(float(nll.mean())))
        assert row["ci"]["ppl_increase"] == rs.ppl_increase(ref, nll).as_dict()  # anyone can recompute it
        per_doc = [d["methods"][row["name"]]["ppl_increase"] for d in doc["documents"]]
        assert min(per_doc) - 1e-12 <= row["ppl_increase"] <= max(per_doc) + 1e-12  # pooled lies between the documents
    kivi4 = next(r for r in doc["methods"] if r["name"] == "kivi4")
    kivi2 = next(r for r in doc["methods"] if r["name"] == "kivi2")
    assert kivi2["kl"] > kivi4["kl"] > 0.0
    assert doc["bar"]["two_bit"] if doc["methods"][-1]["bits_per_channel"] <= 2 else True
    assert doc["config"]["documents"] == 2 and len(doc["documents"]) == 2


def test_sliding_layer_compresses_only_what_it_still_holds():
    model = tiny_model("gemma3")  # layer 0 slides over 16 tokens (holds 15), layer 1 is full
    assert [getattr(l, "is_sliding", False) for l in __import__("transformers").DynamicCache(config=model.config).layers] == [True, False]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 160), generator=g)
    chunk, window = 32, 4
    ref = runner.reference_pass(model, ids, chunk)
    with torch.no_grad():  # the reference through the sliding cache equals one plain forward
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, chunk:-1].double(), ids[0, chunk + 1 :], reduction="sum")
    assert ref.nll == pytest.approx(float(nll), rel=1e-5)
    same = runner.method_pass(model, ids, Identity(), ref, chunk, window)
    assert same.kl == pytest.approx(0.0, abs=1e-9) and same.recon[(0, "k")].rel_err == 0.0
    rec = Recorder()
    res = runner.method_pass(model, ids, rec, ref, chunk, window)
    held = sorted({p for pos in range(chunk, 161, chunk) for p in range(pos - 15, pos - window)})
    for kind in "kv":
        assert sorted(rec.seen[(0, kind)]) == held  # the sliding layer: only tokens it still held
        assert sorted(rec.seen[(1, kind)]) == list(range(160 - window))  # the full layer: every old token once
    assert 0 not in res.attn and res.attn[1].value > 0.0  # attention fidelity on full layers only
    assert res.kl > 0.0


def test_run_eval_end_to_end_on_sliding_model():
    model = tiny_model("gemma3")
    ids = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(3))
    cfg = suite.EvalConfig(bits=(8.0,), baselines=("kivi2", "quanto2"), solvers=("omp",), tokens=160, chunk=32, window=4, needle=False)
    doc = suite.run_eval(model, ids, cfg, tiny_dicts())
    names = [m["name"] for m in doc["methods"]]
    assert names[1:] == ["kivi2", "csr-omp-8b"]
    assert [s["name"] for s in doc["skipped"]] == ["quanto2"] and "sliding-window" in doc["skipped"][0]["reason"]
    csr = doc["methods"][-1]
    assert csr["layers"][0]["rel_err_k"] > 0 and csr["layers"][0]["attn_err"] is None and csr["layers"][1]["attn_err"] > 0
    assert csr["ci"]["ppl_increase"]["lo"] <= csr["ppl_increase"] <= csr["ci"]["ppl_increase"]["hi"]


def test_cli_docs_per_position_and_verdicts(tiny_llama_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from csrtool.cli import app
    from csrtool.formats.dicts import save_dicts

    dicts = tmp_path / "d.safetensors"
    save_dicts(dicts, tiny_dicts().atoms, {"n_atoms": 64}, {"key_space": "post-rope", "model": "tiny"}, {})
    out_json = tmp_path / "eval.json"
    res = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_llama_dir), "--dicts", str(dicts), "--device", "cpu", "--docs", "3", "--tokens", "100",
        "--chunk", "32", "--window", "16", "--bits", "8", "--no-needle", "--calib-tokens", "0", "--threads", "1",
        "--per-position", "--json", str(out_json),
    ])
    assert res.exit_code == 0, res.output
    assert "Δppl per document" in res.output and "doc 3" in res.output
    doc = json.loads(out_json.read_text())
    assert [d["name"] for d in doc["documents"]] == ["heldout[0:100]", "heldout[100:200]", "heldout[200:300]"]
    assert len(doc["per_position"]["reference_nll"]) == 3 * (100 - 33) and doc["config"]["threads"] == 1
    assert set(doc["per_position"]["methods"]) == {"kivi2", "csr-omp-8b"}  # the defaults minus what cannot run here
