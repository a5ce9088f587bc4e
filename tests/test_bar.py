"""The bar verdict (csrtool.eval.suite.bar): the best CSR row per budget against the baseline and KIVI-2."""

from __future__ import annotations

import pytest

from csrtool.eval.suite import bar


def row(name, kind, bits, ppl):
    return {"name": name, "kind": kind, "bits_per_channel": bits, "ppl": ppl}


def test_bar_verdicts():
    rows = [row("reference", "ref", 16.0, 10.0), row("fp16", "fp16", 16.0, 10.0), row("kivi2", "KIVI", 3.0, 11.0),
            row("csr-a", "CSR", 0.94, 10.6), row("csr-b", "CSR", 1.0, 10.4), row("csr-c", "CSR", 1.9, 10.1),
            row("csr-d", "CSR", 2.5, 10.0)]
    v = bar(rows)
    assert v["baseline"] == "fp16" and v["baseline_ppl"] == 10.0
    one = v["one_bit"]  # best at <= 1 bit: csr-b (+4%) vs half of KIVI-2's +10%: met
    assert one["method"] == "csr-b" and one["ppl_increase"] == pytest.approx(0.04)
    assert one["kivi2_ppl_increase"] == pytest.approx(0.10) and one["met"] is True
    two = v["two_bit"]  # best at <= 2 bits: csr-c (+1%; csr-d is over budget): met
    assert two["method"] == "csr-c" and two["ppl_increase"] == pytest.approx(0.01) and two["met"] is True

    rows[4] = row("csr-b", "CSR", 1.0, 10.6)  # +6% > 5%
    rows[5] = row("csr-c", "CSR", 1.9, 10.3)  # +3% > 2%
    v = bar(rows)
    assert v["one_bit"]["met"] is False and v["two_bit"]["met"] is False and v["two_bit"]["method"] == "csr-c"


def test_bar_without_kivi_or_low_budget_rows():
    rows = [row("reference", "ref", 16.0, 8.0), row("csr-c", "CSR", 1.9, 8.1)]
    v = bar(rows)
    assert v["baseline"] == "reference"  # no fp16 row: the first row is the baseline
    assert "one_bit" not in v  # no CSR row fits 1 bit
    assert v["two_bit"]["met"] is True and "kivi2_ppl_increase" not in v["two_bit"]
    v = bar([row("fp16", "fp16", 16.0, 8.0), row("csr", "CSR", 0.9, 8.4)])
    assert "met" not in v["one_bit"] and "target" not in v["one_bit"]  # no KIVI-2 row: no 1-bit verdict
