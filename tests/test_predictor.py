"""The token predictor (csrtool.predictor): fit, context-free K/V, train-dict --predictor, eval with it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from csrtool import codec
from csrtool.cli import app
from csrtool.collect import capture_kv, key_rope, tokenize
from csrtool.errors import CsrError
from csrtool.formats.acts import ActsReader
from csrtool.formats.dicts import load_dicts
from csrtool.models import load_model, rope_info
from csrtool.predictor import TokenPredictor, apply_map, fit_map
from csrtool.reconstruct import Reconstructor

runner = CliRunner()
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! " * 12


def test_fit_map_recovers_a_linear_relation_per_head():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(500, 2, 8, generator=g)
    a = torch.randn(2, 9, 8, generator=g)
    x = apply_map(p, a).transpose(0, 1)  # [T, H, D]
    fitted = fit_map(x, p)
    assert fitted.shape == (2, 9, 8)
    torch.testing.assert_close(apply_map(p, fitted).transpose(0, 1), x, rtol=1e-3, atol=1e-3)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    resid = noisy - apply_map(p, fit_map(noisy, p)).transpose(0, 1)
    assert 0.005 < float(resid.pow(2).mean()) < 0.0101  # only the noise is left (least squares fits a little of it)


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), "cpu", "float32")


def test_context_free_kv_is_the_token_after_the_prefix_and_memoised(loaded):
    tp = TokenPredictor.for_model(loaded, "pre-rope")
    ids = torch.tensor([65, 66, 65, 70])
    p = tp.kv(1, "k", ids)
    assert p.shape == (4, 2, 8) and len(tp.index) == 3
    torch.testing.assert_close(p[0], p[2])
    _, keys, values = capture_kv(loaded.model, torch.tensor([[tp.prefix, 66]]), "pre-rope", key_rope(loaded.model, "pre-rope"))
    torch.testing.assert_close(p[1], keys[1][0, :, 1])
    torch.testing.assert_close(tp.kv(0, "v", ids[1:2])[0], values[0][0, :, 1])
    assert len(tp.index) == 3  # nothing recomputed


def test_a_two_token_context_reads_the_token_before(loaded):
    tp = TokenPredictor.for_model(loaded, "pre-rope", context=2)
    ids = torch.tensor([65, 66, 67, 66])
    p = tp.kv(1, "v", ids)
    rp = key_rope(loaded.model, "pre-rope")
    for i, seq in enumerate(([tp.prefix, tp.prefix, 65], [tp.prefix, 65, 66], [tp.prefix, 66, 67], [tp.prefix, 67, 66])):
        _, _, values = capture_kv(loaded.model, torch.tensor([seq]), "pre-rope", rp)
        torch.testing.assert_close(p[i], values[1][0, :, -1])
    torch.testing.assert_close(tp.kv(1, "v", ids, last=2), p[2:])
    assert len(tp.index) == 4 and not torch.allclose(p[1], p[3])  # token 66 after 65 and after 67
    with pytest.raises(CsrError, match="context must be 1 to 8"):
        TokenPredictor.for_model(loaded, "pre-rope", context=0)


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    (d / "text.txt").write_text(TEXT)
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(d / "text.txt"), "--max-tokens", "600",
                              "--seq-len", "200", "--keys", "pre-rope", "-o", str(d / "acts")])
    assert res.exit_code == 0, res.output
    for name, *flags in (("pred", "--predictor"), ("plain", "--no-predictor"), ("bi", "--predictor", "--predictor-context", "2")):
        res = runner.invoke(app, ["train-dict", str(d / "acts"), "-o", str(d / f"{name}.safetensors"), "--atoms", "16", *flags])
        assert res.exit_code == 0, res.output
    return d


def test_collect_stores_the_token_ids(trained, loaded):
    ids = ActsReader(trained / "acts").ids()
    assert torch.equal(ids, tokenize(loaded.tokenizer, TEXT)[:600])


def test_train_dict_writes_the_maps_it_trained_on(trained, loaded):
    ds, plain = load_dicts(trained / "pred.safetensors"), load_dicts(trained / "plain.safetensors")
    assert ds.predicted and not plain.predicted and ds.config["predictor"] is True
    assert sorted(ds.maps) == sorted(ds.atoms) and ds.pmap(1, "v").shape == (2, 9, 8)
    reader = ActsReader(trained / "acts")
    tp = TokenPredictor.for_model(loaded, "pre-rope")
    x = reader.load(1, "k")
    torch.testing.assert_close(ds.pmap(1, "k"), fit_map(x, tp.kv(1, "k", reader.ids())), rtol=1e-4, atol=1e-4)
    # the atoms were trained on what the map leaves, whose mean is zero (the map has an intercept)
    assert float(ds.mean(1, "k").abs().max()) < 1e-3 < float(plain.mean(1, "k").abs().max())
    assert ds.sensitivity["kl"] and set(ds.sensitivity["kl"]) == set(plain.sensitivity["kl"])


def test_reconstruct_codes_the_residual_and_layer_zero_is_exact(trained, loaded):
    ds, plain = load_dicts(trained / "pred.safetensors"), load_dicts(trained / "plain.safetensors")
    ids = tokenize(loaded.tokenizer, "Five boxing wizards jump quickly; the lazy dog sleeps.")[None]
    _, keys, values = capture_kv(loaded.model, ids)  # keys post-RoPE, as the cache holds them
    cfg = codec.CodecConfig(1, 1, method="omp")
    with pytest.raises(CsrError, match="the model is needed"):
        Reconstructor(ds, cfg, rope_info(loaded.model))
    tp = TokenPredictor.for_model(loaded, "pre-rope")
    rec = Reconstructor(ds, cfg, rope_info(loaded.model), tp)
    base = Reconstructor(plain, cfg, rope_info(loaded.model))
    pos = torch.arange(ids.shape[1])
    with pytest.raises(CsrError, match="needs the ids"):
        rec.reconstruct(0, "v", values[0], pos)
    # layer 0's value is a function of the token alone: the predictor gives it exactly
    v0 = rec.reconstruct(0, "v", values[0], pos, ids)
    err = lambda a, b: float((a - b).pow(2).sum() / b.pow(2).sum())  # noqa: E731
    assert err(v0, values[0]) < 1e-4 < err(base.reconstruct(0, "v", values[0], pos), values[0])
    # by hand: the prediction plus the mean is the offset, then the same codec round trip
    v1 = rec.reconstruct(1, "v", values[1], pos, ids)
    off = apply_map(tp.kv(1, "v", ids[0]), ds.pmap(1, "v"))[None] + ds.mean(1, "v")[None, :, None, :]
    torch.testing.assert_close(v1, codec.roundtrip(values[1], ds.get(1, "v"), 1, "fp8", "omp", off))
    k1 = rec.reconstruct(1, "k", keys[1], pos, ids)
    assert err(k1, keys[1]) < err(base.reconstruct(1, "k", keys[1], pos), keys[1])
    # a two-token context: coding the last 20 tokens reads the ones before them
    bi = load_dicts(trained / "bi.safetensors")
    assert bi.source["predictor_context"] == 2
    tp2 = TokenPredictor.for_dicts(loaded, bi)
    rec2 = Reconstructor(bi, cfg, rope_info(loaded.model), tp2)
    tail = values[1][:, :, -20:]
    off = apply_map(tp2.kv(1, "v", ids[0])[-20:], bi.pmap(1, "v"))[None] + bi.mean(1, "v")[None, :, None, :]
    torch.testing.assert_close(rec2.reconstruct(1, "v", tail, pos[-20:], ids), codec.roundtrip(tail, bi.get(1, "v"), 1, "fp8", "omp", off))


def test_eval_runs_predictor_dictionaries(trained, tiny_llama_dir):
    d = trained
    res = runner.invoke(app, ["eval", "-m", str(tiny_llama_dir), "--dicts", str(d / "pred.safetensors"), "--text", str(d / "text.txt"),
                              "--tokens", "300", "--bits", "4", "--methods", "omp", "--baselines", "kivi2", "--no-needle",
                              "--json", str(d / "eval.json")])
    assert res.exit_code == 0, res.output
    rows = {r["kind"]: r for r in json.loads((d / "eval.json").read_text())["methods"]}
    assert rows["CSR"]["top1_agreement"] > 0.9 and 0 <= rows["CSR"]["kl"] < rows["KIVI"]["kl"]
    assert 0 < rows["CSR"]["rel_err_v"] < 0.05


def test_compress_and_decompress_with_the_predictor(trained, tiny_llama_dir):
    from csrtool.formats.kvcache import load_cache, save_cache

    d = trained
    res = runner.invoke(app, ["cache", "-m", str(tiny_llama_dir), "--prompt", "Sphinx of black quartz, judge my vow. " * 4, "-o", str(d / "cache.pt")])
    assert res.exit_code == 0, res.output
    cache = load_cache(d / "cache.pt")
    assert len(cache.meta["ids"][0]) == cache.keys[0].shape[2]
    errs, sizes = {}, {}
    for name in ("pred", "plain", "bi"):
        dicts = d / f"{name}.safetensors"
        res = runner.invoke(app, ["compress", str(d / "cache.pt"), "-d", str(dicts), "--bits", "2", "-o", str(d / f"{name}.csr"), "--force"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["decompress", str(d / f"{name}.csr"), "-d", str(dicts), "-o", str(d / f"{name}.pt"), "--force"])
        assert res.exit_code == 0, res.output
        back = load_cache(d / f"{name}.pt")
        assert back.meta.get("ids") == (None if name == "plain" else cache.meta["ids"])  # a plain file does not need them
        errs[name] = sum(float((b - a).pow(2).sum()) for a, b in zip(cache.values, back.values))
        sizes[name] = (d / f"{name}.csr").stat().st_size
    assert errs["pred"] < 0.5 * errs["plain"] and errs["bi"] < 0.5 * errs["plain"]  # layer 0's values are exact through the predictor
    n_ids = len(cache.meta["ids"][0])
    assert sizes["plain"] < sizes["pred"] <= sizes["plain"] + 8 * n_ids  # the same codes; the header adds the ids (JSON)
    # a cache without its token ids: a clear error, nothing written
    save_cache(d / "noids.pt", type(cache)(cache.keys, cache.values, {k: v for k, v in cache.meta.items() if k != "ids"}))
    res = runner.invoke(app, ["compress", str(d / "noids.pt"), "-d", str(d / "pred.safetensors"), "-o", str(d / "n.csr")])
    assert res.exit_code != 0 and "token ids" in res.output and "Traceback" not in res.output
    assert not (d / "n.csr").exists()
    # the live cache cannot use them yet, and says so
    from csrtool.cache import CSRCache

    with pytest.raises(CsrError, match="--predictor"):
        CSRCache.from_dicts(d / "pred.safetensors", load_model(str(tiny_llama_dir), "cpu", "float32").model)


def test_predictor_needs_pre_rope_keys(tiny_llama_dir, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(tmp_path / "t.txt"), "--max-tokens", "300",
                              "--keys", "post-rope", "-o", str(tmp_path / "acts")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train-dict", str(tmp_path / "acts"), "-o", str(tmp_path / "d.safetensors"), "--atoms", "16", "--predictor"])
    assert res.exit_code != 0 and "pre-rope" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "d.safetensors").exists()
