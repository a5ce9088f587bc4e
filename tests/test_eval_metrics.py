"""Eval metrics and memory accounting against hand-computed cases."""

import math

import pytest
import torch

from csrtool.errors import CsrError
from csrtool.eval import metrics, report
from csrtool.eval.kivi import KIVI
from csrtool.eval.methods import bits_per_channel
from csrtool.eval.suite import EvalConfig, memory, parse_baseline


def test_rel_sq_error_cosine_sqnr_hand_cases():
    x = torch.tensor([[3.0, 4.0]])
    assert metrics.rel_sq_error(x, torch.tensor([[3.0, 0.0]])) == pytest.approx(16 / 25)
    assert metrics.rel_sq_error(x, x) == 0.0
    assert metrics.cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])) == pytest.approx(1 / math.sqrt(2))
    # two vectors: cosines 1 and 0 -> mean 0.5
    assert metrics.cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)
    assert metrics.sqnr_db(torch.tensor([[10.0, 0.0]]), torch.tensor([[10.0, 1.0]])) == pytest.approx(20.0)
    assert metrics.sqnr_db(x, x) == math.inf
    # the aggregate is energy-weighted: (0 + 1) / (1 + 1)
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert metrics.rel_sq_error(a, b) == pytest.approx(0.5)


def test_kl_top1_perplexity_hand_cases():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    other = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64))
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_per_position(ref, other).tolist() == pytest.approx([kl0, 0.0], abs=1e-12)
    assert metrics.kl_div(ref, other) == pytest.approx(kl0 / 2)
    assert metrics.kl_div(ref, ref + 3.0) == pytest.approx(0.0, abs=1e-12)  # logits shift: same distribution
    assert metrics.top1_agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [2.0, 0.0]])) == 0.5
    assert metrics.perplexity(torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0])) == pytest.approx(4.0)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    # p(targets) = 0.5, 0.25 -> ppl = exp(-(ln .5 + ln .25)/2) = sqrt(8)
    assert metrics.perplexity(logits, torch.tensor([0, 1])) == pytest.approx(math.sqrt(8))
    assert metrics.nll_sum(logits, torch.tensor([0, 1])) == pytest.approx(-math.log(0.125))


def test_error_stats_per_head_and_aggregate():
    st = metrics.ErrorStats()
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[3.0, 4.0], [3.0, 4.0]])  # head 0: energy 50
    x[0, 1] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # head 1: energy 2
    x_hat = x.clone()
    x_hat[0, 0, 0] = torch.tensor([3.0, 0.0])  # head 0 error 16, cosines 0.6 and 1
    x_hat[0, 1, 1] = torch.tensor([0.0, 2.0])  # head 1 error 1, cosines 1 and 1
    st.add(x, x_hat)
    heads = st.per_head()
    assert heads[0]["rel_err"] == pytest.approx(16 / 50)
    assert heads[0]["cos"] == pytest.approx((0.6 + 1.0) / 2)
    assert heads[1]["rel_err"] == pytest.approx(1 / 2)
    assert heads[1]["sqnr_db"] == pytest.approx(-10 * math.log10(0.5))
    assert st.rel_err == pytest.approx(17 / 52)
    assert st.cos == pytest.approx((0.6 + 3.0) / 4)
    st.add(x, x)  # exact copies add energy, no error
    assert st.rel_err == pytest.approx(17 / 104)
    r = metrics.RatioStats()
    assert r.value is None
    r.add(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert r.value == pytest.approx(1.0)


def test_memory_accounting_hand_case():
    m = KIVI(2, group=32)
    assert bits_per_channel(m) == 3.0
    mem = memory(m, tokens=100, window=20, n_layers=2, heads=3, head_dim=8)
    assert mem["bits_with_window"] == pytest.approx((80 * 3 + 20 * 16) / 100)
    assert mem["ratio_vs_fp16"] == pytest.approx(16 / 3)
    mem = memory(m, tokens=100, window=20, n_layers=2, heads=3, head_dim=8, sink=4)  # sink tokens count like the window
    assert mem["bits_with_window"] == pytest.approx((76 * 3 + 24 * 16) / 100)
    m.side_bits = 9600  # e.g. a codebook: 9600 bits over 100 tokens x 2 layers x 3 heads x 2 x 8 channels
    mem = memory(m, tokens=100, window=20, n_layers=2, heads=3, head_dim=8)
    assert mem["bits_total"] == pytest.approx(5.6 + 1.0)


def test_parse_baseline_and_config_errors():
    assert parse_baseline("kivi2") == ("kivi", 2)
    assert parse_baseline("pq") == ("pq", None)
    assert parse_baseline("QUANTO4") == ("quanto", 4)
    for bad in ("kivi5", "quanto3", "zip", "fp16x"):
        with pytest.raises(CsrError, match="unknown baseline"):
            parse_baseline(bad)
    with pytest.raises(CsrError, match="--methods"):
        EvalConfig(solvers=("lasso",))
    with pytest.raises(CsrError, match="--tokens"):
        EvalConfig(tokens=50, chunk=64)
    with pytest.raises(CsrError, match="--window"):
        EvalConfig(window=-1)


def test_json_safe_replaces_non_finite():
    doc = report.json_safe({"a": math.inf, "b": [math.nan, 1.0], "c": (2, "x")})
    assert doc == {"a": None, "b": [None, 1.0], "c": [2, "x"]}
