"""scripts/fuzz.py's machinery on a few cases, so the fuzzer cannot rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from csrtool.formats.kvcache import save_cache

from test_csrfile import make_cache, make_dicts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("csrfuzz", ROOT / "scripts" / "fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["csrfuzz"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules["csrfuzz"]


@pytest.fixture()
def fuzzer(fuzz, tmp_path):
    fz = fuzz.Fuzzer(tmp_path, seed=0, quick=True)
    fz.base.mkdir()
    fz.dicts = make_dicts(fz.base / "dicts.safetensors")
    fz.cache = fz.base / "cache.pt"
    save_cache(fz.cache, make_cache())
    fz.csr = fz.base / "c.csr"
    assert fz.cli(["compress", fz.cache, "-d", fz.dicts, "-o", fz.csr, "--sparsity", "2"])[0] == 0
    return fz


def test_classify(fuzz):
    assert fuzz.classify(0, "", None, [], None) == ("ok", "")
    assert fuzz.classify(1, "error: x not found\n", None, [], None) == ("clean_error", "error: x not found")
    assert fuzz.classify(1, "warning\nerror: x\n", None, [], None)[0] == "traceback"  # not one clean line
    assert fuzz.classify(1, "", ValueError("boom"), [], None) == ("traceback", "ValueError: boom")
    assert fuzz.classify(0, "", None, [], "relative error 4.0") == ("silent_wrong", "relative error 4.0")
    assert fuzz.classify(0, "", None, [".o.csr.csrtmp-1-abcdefgh.tmp"], None)[0] == "leftover"
    assert fuzz.classify(1, "error: disk full\n", None, ["o.csr"], None)[0] == "leftover"


def test_attempt_runs_the_cli_and_verifies(fuzzer, tmp_path):
    d = fuzzer.fresh()
    out = d / "o.csr"
    good = fuzzer.attempt("t", "good", ["compress", fuzzer.cache, "-d", fuzzer.dicts, "-o", out, "--sparsity", "2"], d, [out],
                          lambda: fuzzer.check_csr(out, fuzzer.dicts, fuzzer.cache))
    assert (good.outcome, good.detail) == ("ok", "")
    wrong = fuzzer.attempt("t", "wrong", ["compress", fuzzer.cache, "-d", fuzzer.dicts, "-o", out, "--sparsity", "2", "--force"],
                           d, [out], lambda: "made up")
    assert wrong.outcome == "silent_wrong"
    d = fuzzer.fresh()
    missing = fuzzer.attempt("t", "missing", ["compress", d / "nope.pt", "-d", fuzzer.dicts, "-o", d / "o.csr"], d, [d / "o.csr"])
    assert missing.outcome == "clean_error" and "not found" in missing.detail
    assert fuzzer.counts() == {"tried": 3, "ok": 1, "clean_error": 1, "traceback": 0, "silent_wrong": 1, "leftover": 0}


def test_corruptions_of_a_csr_file_are_all_clean_errors(fuzzer):
    data = fuzzer.csr.read_bytes()
    for pos in fuzzer._positions(len(data), 2)[:6]:
        d = fuzzer.fresh()
        bad = d / "bad.csr"
        bad.write_bytes(data[:pos])
        fuzzer._use("csr", f"truncate @{pos}", bad, d)
    assert {t.outcome for t in fuzzer.tries} == {"clean_error"}, [(t.name, t.outcome, t.detail) for t in fuzzer.tries]
