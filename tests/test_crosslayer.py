"""Cross-layer prediction (csrtool.crosslayer, train-dict --cross-layer): fit, the decoded store, train, eval, compress."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from csrtool import codec, crosslayer
from csrtool.cli import app
from csrtool.collect import capture_kv, tokenize
from csrtool.errors import CsrError
from csrtool.formats.dicts import load_dicts, save_dicts
from csrtool.models import load_model, rope_info
from csrtool.predictor import TokenPredictor, apply_map
from csrtool.reconstruct import Reconstructor

runner = CliRunner()
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! " * 12


def test_inputs_read_the_layer_below_and_values_their_own_keys():
    assert crosslayer.inputs(0, "k") == []
    assert crosslayer.inputs(0, "v") == [(0, "k")]
    assert crosslayer.inputs(3, "k") == [(2, "k"), (2, "v")]
    assert crosslayer.inputs(3, "v") == [(2, "k"), (2, "v"), (3, "k")]
    assert crosslayer.width(3, "v", 2, 8) == 48
    # two layers below (train-dict --cross-depth 2): the nearest first, as far down as there are layers
    assert crosslayer.inputs(3, "v", 2) == [(2, "k"), (2, "v"), (1, "k"), (1, "v"), (3, "k")]
    assert crosslayer.inputs(1, "k", 2) == [(0, "k"), (0, "v")] and crosslayer.inputs(0, "k", 2) == []
    assert crosslayer.width(3, "k", 2, 8, depth=3) == 96


def test_fit_recovers_a_linear_relation_across_heads():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1, 2, 400, 4, generator=g) for _ in range(2)]
    w = torch.randn(17, 8, generator=g)
    y = crosslayer.predict(w, parts)  # [1, H, T, D]
    assert y.shape == (1, 2, 400, 4)
    # by hand: token t's features are part 0's heads, then part 1's, side by side
    f = torch.cat([parts[0][0, 0], parts[0][0, 1], parts[1][0, 0], parts[1][0, 1]], 1)  # [T, 16]
    torch.testing.assert_close(y[0].transpose(0, 1).reshape(400, 8), f @ w[:-1] + w[-1], rtol=1e-5, atol=1e-5)
    fitted = crosslayer.fit(crosslayer.features(parts)[0], y[0].transpose(0, 1))
    torch.testing.assert_close(fitted, w, rtol=2e-2, atol=2e-2)  # the ridge pulls a little
    with pytest.raises(CsrError, match="cross-layer map has shape"):
        crosslayer.predict(w[:-1], parts)


def test_decoded_store_gives_back_the_positions_it_holds_only():
    store = crosslayer.Decoded()
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(1, 2, 10, 3)
    store.put(4, "k", 20, x)
    torch.testing.assert_close(store.get(4, "k", 22, 5), x[:, :, 2:7])
    assert store.get(4, "k", 19, 3) is None and store.get(4, "k", 25, 6) is None and store.get(4, "v", 20, 1) is None
    with pytest.raises(CsrError, match="layer 5 keys are predicted from the decoded keys of layer 4"):
        crosslayer.offset(torch.zeros(13, 6), crosslayer.Decoded(), 5, "k", 20, 2)
    # partial: zeros where the span was not decoded (a sliding-window layer below dropped those tokens)
    got = store.get(4, "k", 27, 5, partial=True)
    torch.testing.assert_close(got[:, :, :3], x[:, :, 7:])
    assert float(got[:, :, 3:].abs().sum()) == 0
    assert store.get(4, "v", 27, 5, partial=True) is None
    w = torch.randn(13, 6)
    like = torch.zeros(1, 2, 5, 3)
    torch.testing.assert_close(crosslayer.offset(w, crosslayer.Decoded(), 5, "k", 20, 4, like=like), w[-1].reshape(2, 3)[None, :, None, :].expand(1, 2, 4, 3))
    store.clear()
    assert store.get(4, "k", 22, 5) is None


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cross")
    (d / "text.txt").write_text(TEXT)
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(d / "text.txt"), "--max-tokens", "600",
                              "--seq-len", "200", "--keys", "pre-rope", "-o", str(d / "acts")])
    assert res.exit_code == 0, res.output
    for name, *flags in (("cross", "--cross-layer"), ("pred", "--no-cross-layer")):
        res = runner.invoke(app, ["train-dict", str(d / "acts"), "-o", str(d / f"{name}.safetensors"), "--atoms", "16", *flags])
        assert res.exit_code == 0, res.output
    return d


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), "cpu", "float32")


def test_train_dict_writes_a_map_for_every_dictionary_with_inputs(trained):
    ds, pred = load_dicts(trained / "cross.safetensors"), load_dicts(trained / "pred.safetensors")
    assert ds.cross_layer and not pred.cross_layer and ds.config["cross_layer"] is True and ds.predicted
    assert sorted(ds.xmaps) == ["layer.0.v", "layer.1.k", "layer.1.v"]
    assert ds.xmap(0, "v").shape == (2 * 8 + 1, 16) and ds.xmap(1, "k").shape == (32 + 1, 16) and ds.xmap(1, "v").shape == (48 + 1, 16)
    # layer 0's keys have nothing below them: the same training rows as without the maps, so the same dictionary
    torch.testing.assert_close(ds.get(0, "k"), pred.get(0, "k"))
    assert not torch.equal(ds.get(1, "k"), pred.get(1, "k"))
    assert ds.sensitivity["kl"] and set(ds.sensitivity["kl"]) == set(pred.sensitivity["kl"])
    # a map of the wrong shape, or one missing, is refused on load
    bad = dict(ds.xmaps)
    bad["layer.1.k"] = bad["layer.1.k"][:-1]
    save_dicts(trained / "bad.safetensors", ds.atoms, ds.config, ds.source, ds.errors, means=ds.means, maps=ds.maps, xmaps=bad)
    with pytest.raises(CsrError, match="cross-layer map of layer.1.k has shape"):
        load_dicts(trained / "bad.safetensors")
    save_dicts(trained / "bad.safetensors", ds.atoms, ds.config, ds.source, ds.errors, means=ds.means, maps=ds.maps,
               xmaps={k: v for k, v in ds.xmaps.items() if k != "layer.0.v"})
    with pytest.raises(CsrError, match="layer.0.v has none"):
        load_dicts(trained / "bad.safetensors")


def test_reconstruct_subtracts_the_prediction_from_the_decoded_layer_below(trained, loaded):
    ds = load_dicts(trained / "cross.safetensors")
    ids = tokenize(loaded.tokenizer, "Five boxing wizards jump quickly; the lazy dog sleeps.")[None]
    keys, values = capture_kv(loaded.model, ids)  # keys post-RoPE, as the cache holds them
    cfg = codec.CodecConfig(2, 2, method="omp")
    tp = TokenPredictor.for_dicts(loaded, ds)
    rec = Reconstructor(ds, cfg, rope_info(loaded.model), tp)
    pos = torch.arange(ids.shape[1])
    blind = rec.reconstruct(1, "v", values[1], pos, ids)  # out of order: nothing decoded below, the maps' bias alone
    rec.reset()
    rec.reconstruct(0, "k", keys[0], pos, ids)
    rec.reconstruct(0, "v", values[0], pos, ids)
    k0, v0 = rec.decoded.get(0, "k", 0, ids.shape[1]), rec.decoded.get(0, "v", 0, ids.shape[1])
    # values: by hand, the token prediction, the mean and the cross-layer prediction are the offset of the same round trip
    k1 = rec.reconstruct(1, "k", keys[1], pos, ids)
    k1c = rec.decoded.get(1, "k", 0, ids.shape[1])
    v1 = rec.reconstruct(1, "v", values[1], pos, ids)
    off = (apply_map(tp.kv(1, "v", ids[0]), ds.pmap(1, "v"))[None] + ds.mean(1, "v")[None, :, None, :]
           + crosslayer.predict(ds.xmap(1, "v"), [k0, v0, k1c]))
    torch.testing.assert_close(v1, codec.roundtrip(values[1], ds.get(1, "v"), 2, "fp8", "omp", off))
    assert k1.shape == keys[1].shape
    err = lambda a: float((a - values[1]).pow(2).sum() / values[1].pow(2).sum())  # noqa: E731
    assert err(v1) < err(blind)  # what the layers below predict, coding no longer has to
    # a new sequence forgets the layers decoded before
    rec.reset()
    torch.testing.assert_close(rec.reconstruct(1, "v", values[1], pos, ids), blind)


def test_compress_and_decompress_decode_what_eval_codes(trained, tiny_llama_dir, loaded):
    """The file's decoder predicts from the layers it decoded, as the encoder did from the same codes: decompress gives
    what the Reconstructor gives for the coded tokens, layer after layer."""
    from csrtool.formats.kvcache import load_cache

    d = trained
    res = runner.invoke(app, ["cache", "-m", str(tiny_llama_dir), "--prompt", "Sphinx of black quartz, judge my vow. " * 4, "-o", str(d / "cache.pt")])
    assert res.exit_code == 0, res.output
    cache = load_cache(d / "cache.pt")
    dicts = d / "cross.safetensors"
    res = runner.invoke(app, ["compress", str(d / "cache.pt"), "-d", str(dicts), "--sparsity", "2", "--fixed", "-o", str(d / "c.csr"), "--force",
                              "--json", str(d / "c.json")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["decompress", str(d / "c.csr"), "-d", str(dicts), "-o", str(d / "c.pt"), "--force"])
    assert res.exit_code == 0, res.output
    back = load_cache(d / "c.pt")
    ds = load_dicts(dicts)
    meta = json.loads((d / "c.json").read_text())
    s, w = meta.get("sink", codec.DEFAULT_SINK), meta.get("window", codec.DEFAULT_WINDOW)
    t = cache.keys[0].shape[2]
    tc = t - s - w
    rec = Reconstructor(ds, codec.CodecConfig(2, 2, method="omp", adaptive=False, set_indices=True), rope_info(loaded.model),
                        TokenPredictor.for_dicts(loaded, ds))
    ids = torch.tensor(cache.meta["ids"])[:, : s + tc]
    pos = torch.arange(s, s + tc)
    for layer in range(2):
        for kind, xs, got in (("k", cache.keys, back.keys), ("v", cache.values, back.values)):
            want = rec.reconstruct(layer, kind, xs[layer][:, :, s : s + tc], pos, ids)
            torch.testing.assert_close(got[layer][:, :, s : s + tc], want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[layer][:, :, :s], xs[layer][:, :, :s])  # the sink, kept as it is
    # the live cache cannot hold these codes yet, and says so
    from csrtool.cache import CSRCache

    with pytest.raises(CsrError, match="--cross-layer"):
        CSRCache.from_dicts(dicts, loaded.model, tokenizer=loaded.tokenizer)


def test_eval_runs_cross_layer_dictionaries(trained, tiny_llama_dir):
    d = trained
    rows = {}
    for name in ("cross", "pred"):
        res = runner.invoke(app, ["eval", "-m", str(tiny_llama_dir), "--dicts", str(d / f"{name}.safetensors"), "--text", str(d / "text.txt"),
                                  "--tokens", "300", "--bits", "4", "--methods", "omp", "--baselines", "kivi2", "--no-needle",
                                  "--json", str(d / f"{name}.json")])
        assert res.exit_code == 0, res.output
        rows[name] = {r["kind"]: r for r in json.loads((d / f"{name}.json").read_text())["methods"]}
    cross, pred = rows["cross"]["CSR"], rows["pred"]["CSR"]
    assert cross["top1_agreement"] > 0.9 and 0 <= cross["kl"] < rows["cross"]["KIVI"]["kl"]
    assert cross["side_bits"] > pred["side_bits"]  # the maps are side data, counted
    assert cross["config"]["cross_layer"] is True and pred["config"]["cross_layer"] is False  # and reported


def test_cross_layer_is_the_default_where_every_layer_is_trained(trained, tiny_llama_dir):
    res = runner.invoke(app, ["train-dict", str(trained / "acts"), "-o", str(trained / "dflt.safetensors"), "--atoms", "16",
                              "--no-calibrate", "--json", str(trained / "dflt.json")])
    assert res.exit_code == 0, res.output
    assert "cross-layer prediction: on" in res.output and json.loads((trained / "dflt.json").read_text())["cross_layer"] is True
    ds, cross = load_dicts(trained / "dflt.safetensors"), load_dicts(trained / "cross.safetensors")
    assert sorted(ds.xmaps) == sorted(cross.xmaps)
    torch.testing.assert_close(ds.xmap(1, "v"), cross.xmap(1, "v"))  # the same training as --cross-layer
    torch.testing.assert_close(ds.get(1, "v"), cross.get(1, "v"))
    # a subset of the layers: off, and said why
    res = runner.invoke(app, ["train-dict", str(trained / "acts"), "-o", str(trained / "one.safetensors"), "--atoms", "16", "--layers", "1",
                              "--no-calibrate", "--json", str(trained / "one.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((trained / "one.json").read_text())
    assert "cross-layer prediction: off (--layers picks a subset" in " ".join(res.output.split())
    assert report["cross_layer"] is False and "--layers" in report["cross_layer_off"] and not load_dicts(trained / "one.safetensors").cross_layer
    # too few tokens for maps of 3·H·D = 48 inputs (8 tokens each): off, and said why
    res = runner.invoke(app, ["collect", "-m", str(tiny_llama_dir), "-t", str(trained / "text.txt"), "--max-tokens", "300",
                              "--seq-len", "100", "-o", str(trained / "acts300")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train-dict", str(trained / "acts300"), "-o", str(trained / "few.safetensors"), "--atoms", "16", "--no-calibrate"])
    assert res.exit_code == 0, res.output
    assert "too few to fit its maps; collect at least 384" in " ".join(res.output.split())
    assert not load_dicts(trained / "few.safetensors").cross_layer


def test_cross_layer_trains_every_layer_in_one_process(trained):
    res = runner.invoke(app, ["train-dict", str(trained / "acts"), "-o", str(trained / "x.safetensors"), "--atoms", "16", "--cross-layer",
                              "--layers", "1", "--no-calibrate"])
    assert res.exit_code != 0 and "train every layer from 0" in res.output and "Traceback" not in res.output
    assert not (trained / "x.safetensors").exists()


def test_a_sliding_window_shorter_than_the_chunk_predicts_from_what_it_kept(tiny_model_dirs, tmp_path):
    """Gemma 3's sliding layers drop tokens; eval's chunks of 64 outrun a window of 16, so the layer above codes tokens the
    one below never coded: they are predicted without it, and the file path (all tokens kept) decodes exactly."""
    m = tiny_model_dirs["gemma3"]
    (tmp_path / "t.txt").write_text(TEXT)
    for args in (["collect", "-m", str(m), "-t", str(tmp_path / "t.txt"), "--max-tokens", "600", "--seq-len", "200", "-o", str(tmp_path / "acts")],
                 ["train-dict", str(tmp_path / "acts"), "-o", str(tmp_path / "x.safetensors"), "--atoms", "16", "--cross-layer"],
                 ["eval", "-m", str(m), "--dicts", str(tmp_path / "x.safetensors"), "--text", str(tmp_path / "t.txt"), "--tokens", "300",
                  "--bits", "4", "--methods", "omp", "--baselines", "kivi2", "--no-needle", "--json", str(tmp_path / "e.json")],
                 ["cache", "-m", str(m), "--prompt", "Sphinx of black quartz, judge my vow. " * 4, "-o", str(tmp_path / "c.pt")],
                 ["compress", str(tmp_path / "c.pt"), "-d", str(tmp_path / "x.safetensors"), "--bits", "2", "-o", str(tmp_path / "c.csr")],
                 ["decompress", str(tmp_path / "c.csr"), "-d", str(tmp_path / "x.safetensors"), "-o", str(tmp_path / "r.pt")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    csr = next(r for r in json.loads((tmp_path / "e.json").read_text())["methods"] if r["kind"] == "CSR")
    assert 0 <= csr["kl"] < 0.1 and csr["top1_agreement"] > 0.9


def test_maps_can_read_two_layers_below_and_decompress_follows_them(tmp_path):
    """Three layers, --cross-depth 2: layer 2 is predicted from layers 1 and 0 (format version 4, config.cross_depth 2);
    decompress decodes exactly what eval's Reconstructor codes with those maps, and the default (or a file before the
    field) reads the layer just below."""
    from safetensors import safe_open

    from csrtool.formats.kvcache import load_cache
    from tiny import save_tiny

    m = save_tiny(tmp_path / "m3", "llama", layers=3)
    (tmp_path / "t.txt").write_text(TEXT)
    res = runner.invoke(app, ["collect", "-m", str(m), "-t", str(tmp_path / "t.txt"), "--max-tokens", "900", "--seq-len", "300",
                              "--keys", "pre-rope", "-o", str(tmp_path / "acts")])
    assert res.exit_code == 0, res.output
    for name, flags in (("two", ["--cross-depth", "2"]), ("one", [])):
        res = runner.invoke(app, ["train-dict", str(tmp_path / "acts"), "-o", str(tmp_path / f"{name}.safetensors"), "--atoms", "16", *flags])
        assert res.exit_code == 0, res.output
        assert "cross-layer prediction: on" in res.output
    two, one = load_dicts(tmp_path / "two.safetensors"), load_dicts(tmp_path / "one.safetensors")
    assert two.cross_depth == 2 and one.cross_depth == 1
    assert two.xmap(2, "k").shape == (4 * 16 + 1, 16) and two.xmap(2, "v").shape == (5 * 16 + 1, 16)
    assert one.xmap(2, "k").shape == (2 * 16 + 1, 16) and two.xmap(1, "v").shape == one.xmap(1, "v").shape == (3 * 16 + 1, 16)
    with safe_open(str(tmp_path / "two.safetensors"), framework="pt") as fh, safe_open(str(tmp_path / "one.safetensors"), framework="pt") as fo:
        assert fh.metadata()["version"] == "4" and fo.metadata()["version"] == "3"
    # a file written before the field reads one layer below; a depth its maps do not fit, or a corrupted one, is refused
    old = {k: v for k, v in one.config.items() if k != "cross_depth"}
    save_dicts(tmp_path / "old.safetensors", one.atoms, old, one.source, one.errors, means=one.means, maps=one.maps, xmaps=one.xmaps)
    assert load_dicts(tmp_path / "old.safetensors").cross_depth == 1
    for depth, match in ((2, "cross-layer map of layer.2.k has shape"), ("2", "corrupted config"), (0, "corrupted config")):
        save_dicts(tmp_path / "bad.safetensors", one.atoms, {**one.config, "cross_depth": depth}, one.source, one.errors, means=one.means,
                   maps=one.maps, xmaps=one.xmaps)
        with pytest.raises(CsrError, match=match):
            load_dicts(tmp_path / "bad.safetensors")
    # the file's decoder predicts layer 2 from both layers it decoded below, as eval's Reconstructor does
    three = load_model(str(m), "cpu", "float32")
    res = runner.invoke(app, ["cache", "-m", str(m), "--prompt", "Sphinx of black quartz, judge my vow. " * 4, "-o", str(tmp_path / "c.pt")])
    assert res.exit_code == 0, res.output
    cache = load_cache(tmp_path / "c.pt")
    d = tmp_path / "two.safetensors"
    for args in (["compress", str(tmp_path / "c.pt"), "-d", str(d), "--sparsity", "2", "--fixed", "-o", str(tmp_path / "c.csr"),
                  "--json", str(tmp_path / "c.json")],
                 ["decompress", str(tmp_path / "c.csr"), "-d", str(d), "-o", str(tmp_path / "r.pt")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    back = load_cache(tmp_path / "r.pt")
    meta = json.loads((tmp_path / "c.json").read_text())
    s, w = meta.get("sink", codec.DEFAULT_SINK), meta.get("window", codec.DEFAULT_WINDOW)
    tc = cache.keys[0].shape[2] - s - w
    rec = Reconstructor(two, codec.CodecConfig(2, 2, method="omp", adaptive=False, set_indices=True), rope_info(three.model),
                        TokenPredictor.for_dicts(three, two))
    ids, pos = torch.tensor(cache.meta["ids"])[:, : s + tc], torch.arange(s, s + tc)
    for layer in range(3):
        for kind, xs, got in (("k", cache.keys, back.keys), ("v", cache.values, back.values)):
            want = rec.reconstruct(layer, kind, xs[layer][:, :, s : s + tc], pos, ids)
            torch.testing.assert_close(got[layer][:, :, s : s + tc], want, rtol=1e-4, atol=1e-5)
    # and the prediction of layer 2 really reads layer 0: without it, decoding gives another result
    k0 = rec.decoded.get(0, "k", s, tc)
    rec.decoded.put(0, "k", s, torch.zeros_like(k0))
    moved = crosslayer.offset(two.xmap(2, "k"), rec.decoded, 2, "k", s, tc, depth=2)
    rec.decoded.put(0, "k", s, k0)
    assert not torch.allclose(moved, crosslayer.offset(two.xmap(2, "k"), rec.decoded, 2, "k", s, tc, depth=2))
