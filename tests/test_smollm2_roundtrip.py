"""Real model: SmolLM2 keys and values through collect -> train-dict -> cache -> compress -> decompress."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from csrtool.cli import app
from csrtool.errors import CsrError
from csrtool.formats.kvcache import load_cache
from csrtool.models import builtin_gguf


def _run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    try:
        builtin_gguf("smollm2-135m")
    except CsrError as exc:
        pytest.skip(str(exc))
    d = tmp_path_factory.mktemp("smollm2")
    _run("collect", "-o", d / "acts", "--max-tokens", 512, "--seq-len", 256, "--keys", "pre-rope", "--device", "cpu", "--dtype", "float32")
    _run("train-dict", d / "acts", "-o", d / "dicts.safetensors", "--atoms", 128, "--scope", "layer", "--epochs", 0, "--no-calibrate")
    _run("cache", "-o", d / "cache.pt", "--heldout", "--max-tokens", 128, "--device", "cpu", "--dtype", "float32")
    return d


def _rel_errors(files, sparsity: str) -> tuple[list[float], list[float]]:
    d = files
    _run("compress", d / "cache.pt", "-d", d / "dicts.safetensors", "-o", d / f"{sparsity}.csr", "--sparsity", sparsity)
    _run("decompress", d / f"{sparsity}.csr", "-d", d / "dicts.safetensors", "-o", d / f"{sparsity}.pt")
    orig, back = load_cache(d / "cache.pt"), load_cache(d / f"{sparsity}.pt")
    errs = {"k": [], "v": []}
    for kind, xs, ys in (("k", orig.keys, back.keys), ("v", orig.values, back.values)):
        for x, y in zip(xs, ys):
            assert y.shape == x.shape and y.dtype == x.dtype
            assert torch.equal(y[:, :, :4], x[:, :, :4]) and torch.equal(y[:, :, -4:], x[:, :, -4:])  # sink, window
            mid_x, mid_y = x[:, :, 4:-4].float(), y[:, :, 4:-4].float()
            errs[kind].append(float((mid_y - mid_x).pow(2).sum() / mid_x.pow(2).sum()))
    return errs["k"], errs["v"]


@pytest.mark.slow
def test_smollm2_compress_decompress_error_bound(files):
    """Measured (128 k-means atoms per layer, 512 training tokens): at S 4/4 keys 0.02-0.14
    relative error per layer (mean 0.09), values 0.16-0.54 (mean 0.44); bounds with margin."""
    k4, v4 = _rel_errors(files, "4,4")
    assert max(k4) < 0.2 and sum(k4) / len(k4) < 0.12
    assert max(v4) < 0.7 and sum(v4) / len(v4) < 0.55
    k1, v1 = _rel_errors(files, "1,1")  # one atom: worse in every layer
    assert all(a < b for a, b in zip(k4 + v4, k1 + v1))
