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
from csrtool.predictor import TokenPredictor, apply_map, fit_map, fit_prediction, map_channels, raw_map
from csrtool.reconstruct import Reconstructor
from test_cache import _feed

runner = CliRunner()
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! " * 12


def _linear(p, a):
    """[T, H, D]: [p, 1]·A[h] exactly (apply_map rounds it to int8 per vector)."""
    return (torch.einsum("thd,hde->hte", p, a[:, :-1]) + a[:, -1][:, None, :]).transpose(0, 1)


def test_fit_map_recovers_a_linear_relation_per_head():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(500, 2, 8, generator=g)
    a = torch.randn(2, 9, 8, generator=g)
    x = _linear(p, a)  # [T, H, D]
    fitted = fit_map(x, p)
    assert fitted.shape == (2, 9, 8)
    torch.testing.assert_close(fitted, a, rtol=1e-3, atol=1e-3)
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    resid = noisy - _linear(p, fit_map(noisy, p))
    assert 0.005 < float(resid.pow(2).mean()) < 0.0101  # only the noise is left (least squares fits a little of it)


def test_predictions_are_int8_per_vector():
    """apply_map = the exact map rounded per vector to int8 with a float16 absmax scale: within half a step of it
    (a map of csrtool before channel scales, [H, D + 1, D])."""
    g = torch.Generator().manual_seed(1)
    p, a = torch.randn(300, 2, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    exact = _linear(p, a).transpose(0, 1)  # [H, T, D]
    got = apply_map(p, a)
    q, scale = raw_map(p, a)
    assert map_channels(a) is None
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and q.shape == (2, 300, 8) and scale.shape == (2, 300)
    torch.testing.assert_close(got, q.float() * scale.float()[..., None], rtol=0, atol=0)
    step = exact.abs().amax(-1, keepdim=True) / 127
    assert bool(((got - exact).abs() <= 0.51 * step * 1.002 + 1e-6).all())  # half a step (plus the float16 scale's rounding)
    assert int(q.abs().amax(-1).min()) >= 126  # each vector uses the whole range
    assert float((got - exact).pow(2).sum() / exact.pow(2).sum()) < 1e-4


def test_channel_scales_keep_an_outlier_channel_from_setting_every_step():
    """fit_prediction's map carries each channel's RMS; rounding divides by it first, so a channel 50x larger than the
    others (Gemma-3's normalised keys) no longer coarsens the small channels' steps."""
    g = torch.Generator().manual_seed(2)
    p = torch.randn(400, 2, 8, generator=g)
    x = _linear(p, torch.randn(2, 9, 8, generator=g)) * torch.tensor([50.0] + [1.0] * 7)  # channel 0 large
    a, pred = fit_prediction(x, p)
    assert a.shape == (2, 10, 8)
    exact = _linear(p, a[:, :9])
    c = map_channels(a)
    torch.testing.assert_close(c, exact.pow(2).mean(0).sqrt(), rtol=1e-5, atol=0)
    assert float(c[:, 0].min()) > 10 * float(c[:, 1:].max())
    q, scale = raw_map(p, a)
    torch.testing.assert_close(pred, (q.float() * scale.float()[..., None] * c[:, None, :]).transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(apply_map(p, a).transpose(0, 1), pred, rtol=0, atol=0)
    step = (exact / c).abs().amax(-1, keepdim=True) / 127 * c  # half a step in the divided space, per channel
    assert bool(((pred - exact).abs() <= 0.51 * step * 1.002 + 1e-6).all())
    small = lambda got: float((got - exact)[..., 1:].pow(2).sum() / exact[..., 1:].pow(2).sum())  # noqa: E731
    per_vector = apply_map(p, a[:, :9]).transpose(0, 1)
    assert small(pred) * 20 < small(per_vector)  # the small channels: at least 20x less rounding error


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), "cpu", "float32")


def test_context_free_kv_is_the_token_after_the_prefix_and_memoised(loaded):
    tp = TokenPredictor.for_model(loaded, "pre-rope")
    ids = torch.tensor([65, 66, 65, 70])
    p = tp.kv(1, "k", ids)
    assert p.shape == (4, 2, 8) and len(tp.index) == 3
    torch.testing.assert_close(p[0], p[2])
    keys, values = capture_kv(loaded.model, torch.tensor([[tp.prefix, 66]]), "pre-rope", key_rope(loaded.model, "pre-rope"))
    torch.testing.assert_close(p[1], keys[1][0, :, 1])
    torch.testing.assert_close(tp.kv(0, "v", ids[1:2])[0], values[0][0, :, 1])
    assert len(tp.index) == 3  # nothing recomputed


def test_a_two_token_context_reads_the_token_before(loaded):
    tp = TokenPredictor.for_model(loaded, "pre-rope", context=2)
    ids = torch.tensor([65, 66, 67, 66])
    p = tp.kv(1, "v", ids)
    rp = key_rope(loaded.model, "pre-rope")
    for i, seq in enumerate(([tp.prefix, tp.prefix, 65], [tp.prefix, 65, 66], [tp.prefix, 66, 67], [tp.prefix, 67, 66])):
        _, values = capture_kv(loaded.model, torch.tensor([seq]), "pre-rope", rp)
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
    for name, *flags in (("pred", "--predictor"), ("plain", "--no-predictor"), ("bi", "--predictor", "--predictor-context", "2"),
                         ("d1", "--predictor-depth", "1")):
        # without cross-layer maps: the live cache tests below use these dictionaries (tests/test_crosslayer.py has them)
        res = runner.invoke(app, ["train-dict", str(d / "acts"), "-o", str(d / f"{name}.safetensors"), "--atoms", "16", "--no-cross-layer", *flags])
        assert res.exit_code == 0, res.output
    return d


def test_collect_stores_the_token_ids(trained, loaded):
    ids = ActsReader(trained / "acts").ids()
    assert torch.equal(ids, tokenize(loaded.tokenizer, TEXT)[:600])


def test_train_dict_writes_the_maps_it_trained_on(trained, loaded):
    ds, plain = load_dicts(trained / "pred.safetensors"), load_dicts(trained / "plain.safetensors")
    assert ds.predicted and not plain.predicted and ds.config["predictor"] is True
    assert sorted(ds.maps) == sorted(ds.atoms) and ds.pmap(1, "v").shape == (2, 10, 8)
    reader = ActsReader(trained / "acts")
    tp = TokenPredictor.for_model(loaded, "pre-rope")
    x, p = reader.load(1, "k"), tp.kv(1, "k", reader.ids())
    a = fit_map(x, p)
    torch.testing.assert_close(ds.pmap(1, "k")[:, :9], a, rtol=1e-4, atol=1e-4)
    # row D + 1: each channel's RMS of the exact predictions on the training vectors
    rms = _linear(p, a).pow(2).mean(0).sqrt()  # [H, D]
    torch.testing.assert_close(map_channels(ds.pmap(1, "k")), rms, rtol=1e-3, atol=1e-5)
    # the atoms were trained on what the map leaves, whose mean is zero (the map has an intercept)
    assert float(ds.mean(1, "k").abs().max()) < 1e-3 < float(plain.mean(1, "k").abs().max())
    assert ds.sensitivity["kl"] and set(ds.sensitivity["kl"]) == set(plain.sensitivity["kl"])


def test_reconstruct_codes_the_residual_and_layer_zero_is_exact(trained, loaded):
    ds, plain = load_dicts(trained / "pred.safetensors"), load_dicts(trained / "plain.safetensors")
    ids = tokenize(loaded.tokenizer, "Five boxing wizards jump quickly; the lazy dog sleeps.")[None]
    keys, values = capture_kv(loaded.model, ids)  # keys post-RoPE, as the cache holds them
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
    # the live cache needs the tokenizer for them, and says so
    from csrtool.cache import CSRCache

    with pytest.raises(CsrError, match="tokenizer"):
        CSRCache.from_dicts(d / "pred.safetensors", load_model(str(tiny_llama_dir), "cpu", "float32").model)


@pytest.mark.parametrize("name", ["pred", "bi", "d1"])
def test_live_cache_codes_like_eval_with_the_predictor(trained, loaded, name):
    """CSRCache with predictor dictionaries (block=1) codes each token when eval's CompressedFeed does, subtracting the same
    prediction: the same logits (to 1e-4), far from the cache without the predictor's part; attention on the codes
    equals reconstruct-then-attend with it."""
    from csrtool.cache import CSRCache
    from csrtool.eval import runner as eval_runner
    from csrtool.eval.csr import CSR

    model, tok = loaded.model, loaded.tokenizer
    ds = load_dicts(trained / f"{name}.safetensors")
    ids = tokenize(tok, "Five boxing wizards jump quickly; the lazy dog sleeps. " * 3)[None, :90]
    chunk, window, sink = 16, 8, 4
    method = CSR(ds, 2, 2, 8, bits=None, sparsity=(2, 2), method="omp", coef="fp8", rope_info=rope_info(model),
                 predictor=TokenPredictor.for_dicts(loaded, ds))
    feed = eval_runner.CompressedFeed(model, method, window=window, sink=sink)
    with torch.no_grad():
        want = torch.cat([feed.step(ids[:, s : s + chunk])[None] for s in range(0, ids.shape[1], chunk)], 1)
    got = {}
    for reference in (False, True):
        with CSRCache.from_dicts(ds, model, sparsity=(2, 2), window=window, sink=sink, block=1, reference=reference, tokenizer=tok) as cache:
            got[reference] = _feed(model, cache, ids, chunk)
            assert cache.layers[1].k.tokens == feed.done - sink
            n = cache.nbytes()
            assert n["predictor"] > 0 and n["total"] == n["codes"] + n["dense"] + n["predictor"]
            assert len(cache.predictions.index) == len(set(TokenPredictor.for_dicts(loaded, ds).keys(ids[0])))
    torch.testing.assert_close(got[False], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[False], got[True], rtol=1e-4, atol=1e-4)
    with CSRCache.from_dicts(ds, model, sparsity=(2, 2), window=window, sink=sink, block=1, tokenizer=tok) as cache:
        cache.pred = lambda *a: None  # the same codes with the predictor's part left out
        assert float((_feed(model, cache, ids, chunk) - want).abs().max()) > 1e-2


def test_live_cache_with_the_predictor_generates_saves_and_resumes(trained, loaded, tmp_path):
    """generate on predictor dictionaries (batch 2, left padding); the saved .csr keeps the ids, decompress reads it,
    and from_csr continues like a DynamicCache of decompress's output."""
    from transformers import DynamicCache

    from csrtool.cache import CSRCache
    from csrtool.formats import csrfile

    model, tok = loaded.model, loaded.tokenizer
    ds = load_dicts(trained / "pred.safetensors")
    a = tokenize(tok, "Sphinx of black quartz, judge my vow. " * 2)
    ids = torch.stack([a[:50], torch.cat([torch.full((6,), 5), a[:44]])])
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with CSRCache.from_dicts(ds, model, bits=4.0, window=4, sink=2, block=3, tokenizer=tok) as cache:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, past_key_values=cache)
        assert out.shape == (2, 62) and cache.predictions.ids.shape == (2, 61)
        assert torch.equal(cache.predictions.ids, out[:, :61])
    one = tokenize(tok, "Pack my box with five dozen liquor jugs, then " * 2)[None, :40]
    path = tmp_path / "p.csr"
    with CSRCache.from_dicts(ds, model, bits=4.0, window=4, sink=2, block=3, tokenizer=tok) as cache:
        _feed(model, cache, one[:, :32], 8)
        cache.save(path)
    hd = csrfile.open_csr(path).header
    assert hd.meta["ids"] == one[:, :32].tolist()
    restored = csrfile.read_csr(path, ds, TokenPredictor.for_dicts(loaded, ds))
    ref = DynamicCache()
    for i, (k, v) in enumerate(zip(restored.keys, restored.values)):
        ref.update(k, v, i)
    want = _feed(model, ref, one[:, 32:], 4)
    with CSRCache.from_csr(path, ds, model, block=1000, tokenizer=tok) as cache:
        got = _feed(model, cache, one[:, 32:], 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(CsrError, match="tokenizer"):
        CSRCache.from_csr(path, ds, model)


def test_live_cache_with_the_predictor_needs_input_ids(trained, loaded):
    from csrtool.cache import CSRCache

    ds = load_dicts(trained / "pred.safetensors")
    ids = tokenize(loaded.tokenizer, "Sphinx of black quartz")[None]
    emb = loaded.model.get_input_embeddings()(ids)
    with CSRCache.from_dicts(ds, loaded.model, bits=4.0, tokenizer=loaded.tokenizer) as cache:
        with pytest.raises(CsrError, match="input_ids"), torch.no_grad():
            loaded.model(inputs_embeds=emb, past_key_values=cache, use_cache=True)
    with CSRCache.from_dicts(ds, loaded.model, bits=4.0, tokenizer=loaded.tokenizer) as cache:
        pass
    assert not loaded.model.get_input_embeddings()._forward_hooks  # closing removed the id hook


def test_predictor_needs_pre_rope_keys(tiny_llama_dir, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(tmp_path / "t.txt"), "--max-tokens", "300",
                              "--keys", "post-rope", "-o", str(tmp_path / "acts")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train-dict", str(tmp_path / "acts"), "-o", str(tmp_path / "d.safetensors"), "--atoms", "16", "--predictor"])
    assert res.exit_code != 0 and "pre-rope" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "d.safetensors").exists()
    # without the flag the default leaves it out, and says why
    res = runner.invoke(app, ["train-dict", str(tmp_path / "acts"), "-o", str(tmp_path / "d.safetensors"), "--atoms", "16", "--no-calibrate"])
    assert res.exit_code == 0, res.output
    assert "token predictor: off" in res.output and "pre-rope" in res.output
    assert not load_dicts(tmp_path / "d.safetensors").predicted


def test_the_predictor_is_the_default_where_the_collection_allows_it(trained, tmp_path):
    res = runner.invoke(app, ["train-dict", str(trained / "acts"), "-o", str(tmp_path / "d.safetensors"), "--atoms", "16",
                              "--no-calibrate", "--no-cross-layer", "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    assert "token predictor: on" in res.output and json.loads((tmp_path / "t.json").read_text())["predictor"] is True
    ds, pred = load_dicts(tmp_path / "d.safetensors"), load_dicts(trained / "pred.safetensors")
    assert ds.predicted and sorted(ds.maps) == sorted(pred.maps)
    torch.testing.assert_close(ds.atoms["layer.1.v"], pred.atoms["layer.1.v"])  # the same training as --predictor


def test_predictor_depth_maps_only_the_first_layers(trained, loaded):
    ds, plain = load_dicts(trained / "d1.safetensors"), load_dicts(trained / "plain.safetensors")
    assert sorted(ds.maps) == ["layer.0.k", "layer.0.v"]
    torch.testing.assert_close(ds.atoms["layer.1.k"], plain.atoms["layer.1.k"])  # layer 1 trained on the vectors themselves
    # eval-side decoding: layer 1 is the plain codec round trip around its mean
    ids = tokenize(loaded.tokenizer, "Five boxing wizards jump quickly.")[None]
    _, values = capture_kv(loaded.model, ids)
    rec = Reconstructor(ds, codec.CodecConfig(1, 1, method="omp"), rope_info(loaded.model), TokenPredictor.for_dicts(loaded, ds))
    pos = torch.arange(ids.shape[1])
    torch.testing.assert_close(rec.reconstruct(1, "v", values[1], pos, ids),
                               codec.roundtrip(values[1], ds.get(1, "v"), 1, "fp8", "omp", ds.mean(1, "v")))


def test_cli_generate_saves_and_resumes_with_the_predictor(trained, tiny_llama_dir, tmp_path):
    """csrtool generate on the default (predictor) dictionaries: the predictions' bytes are reported, a saved file
    keeps the token ids, decompress decodes it with the model and --resume continues it."""
    from csrtool.formats.kvcache import load_cache

    base = ["generate", "--model", str(tiny_llama_dir), "--dicts", str(trained / "pred.safetensors"), "--device", "cpu"]
    prompt, saved = "Sphinx of black quartz, judge my vow. " * 2, tmp_path / "p.csr"
    res = runner.invoke(app, [*base, "--bits", "4", "--max-new-tokens", "9", "--save", str(saved), "--json", str(tmp_path / "g.json"), prompt])
    assert res.exit_code == 0, res.output
    held = json.loads((tmp_path / "g.json").read_text())["cache_bytes"]
    assert held["predictor"] > 0 and held["total"] == held["codes"] + held["dense"] + held["predictor"]
    assert "token predictions" in res.output
    res = runner.invoke(app, ["inspect", str(saved), "--json"])
    assert res.exit_code == 0, res.output
    ids = json.loads(res.stdout)["header"]["meta"]["ids"]
    assert len(ids) == 1 and len(ids[0]) == len(prompt) + 9  # byte-level tokenizer: one token per character
    res = runner.invoke(app, ["decompress", str(saved), "--dicts", str(trained / "pred.safetensors"), "-o", str(tmp_path / "kv.pt")])
    assert res.exit_code == 0, res.output
    assert load_cache(tmp_path / "kv.pt").keys[0].shape[2] == len(prompt) + 9
    res = runner.invoke(app, [*base, "--resume", str(saved), "--max-new-tokens", "4", "--json", str(tmp_path / "g2.json"), " and"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "g2.json").read_text())["new_tokens"] == 4
