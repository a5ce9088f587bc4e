"""CSRCache.save: a live compressed cache written as a .csr file, read back by decompress and from_csr (tiny models)."""

from __future__ import annotations

import pytest
import torch

from csrtool import codec
from csrtool.cache import CSRCache
from csrtool.engine.attention import reconstruct
from csrtool.errors import CsrError
from csrtool.formats import csrfile
from csrtool.formats.dicts import DictSet, fingerprint
from csrtool.models import rope_info
from test_cache import _feed, padded_batch, tiny_dicts
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW, SINK, BLOCK = 5, 3, 4


def file_dicts(key_space: str, n: int = 64) -> DictSet:
    """tiny_dicts with the shared key dictionary repeated per head: a .csr file has one scope for K and V."""
    d = tiny_dicts(key_space, n=n, centred=True)
    per_head = lambda a: a if a.shape[0] == 2 else a.expand(2, *a.shape[1:]).clone()  # noqa: E731
    atoms = {name: per_head(a) for name, a in d.atoms.items()}
    return DictSet(atoms=atoms, source=d.source, means={name: per_head(m) for name, m in d.means.items()}, fingerprint=fingerprint(atoms))


def generated_cache(model, d, ids, coef: str, new: int = 11, **kw) -> CSRCache:
    """An open CSRCache after greedy generation of `new` tokens after ids (its tail holds tokens waiting to be coded)."""
    cache = CSRCache.from_dicts(d, model, sparsity=(2, 1), coef=coef, window=WINDOW, sink=SINK, block=BLOCK, **kw)
    model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, past_key_values=cache)
    return cache


def dense_view(cache: CSRCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [B, H, T, D] (post-RoPE) the live layer stands for: sink, its codes decoded, tail."""
    x = cache.layers[layer]
    kc, vc = reconstruct(x.k.codes()), reconstruct(x.v.codes())
    if cache.setting.key_space == "pre-rope":
        info = cache.setting.rope_info
        rp = codec.RopeParams(tuple(info["inv_freq"]), info["scaling"], x.n_sink)
        kc = codec.from_code_space(kc, "pre-rope", "post-rope", rp)
    return torch.cat([x.sink_k, kc, x.keys], 2), torch.cat([x.sink_v, vc, x.values], 2)


@pytest.mark.parametrize("key_space", ["post-rope", "pre-rope"])
def test_resumed_file_continues_like_the_cache(key_space, tmp_path):
    """fp16 coefficients: the file's one scale per (batch, head) is 1, as each block's was: the re-quantisation is exact,
    so continuing from the file gives the cache's own logits (batch 2, 1e-5: float32 sums over blocks in another order)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(6))
    more = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(7))
    d = file_dicts(key_space)
    path = tmp_path / "c.csr"
    with generated_cache(model, d, ids, "fp16") as cache:
        held = cache.get_seq_length()
        assert cache.layers[0].keys.shape[2] > WINDOW  # tokens waiting to be coded: save codes them
        size = cache.save(path)
        layer = cache.layers[0]
        assert (layer.n_sink, layer.k.tokens, layer.keys.shape[2]) == (SINK, held - SINK - WINDOW, WINDOW)
        want = _feed(model, cache, more, 1)
    assert size == path.stat().st_size
    with CSRCache.from_csr(path, d, model, block=BLOCK) as resumed:
        assert resumed.get_seq_length() == held == 37 + 10  # the last generated token was never run through the model
        got = _feed(model, resumed, more, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("coef", ["fp8", "int4/fp8"])
def test_fp8_resave_is_a_second_rounding(coef, tmp_path):
    """fp8: the file's single scale per (batch, head) rounds the coefficients once more (a step of e4m3);
    the logits move far less than coding moved them (measured 1.4% of it here; bounded at 5%). fp8 keys with
    int4 keys (one atom of 8 channels: within int4's Dc/8) within the same bound."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(8))
    more = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(9))
    d = file_dicts("post-rope")
    path = tmp_path / "c.csr"
    sp = (2, 1) if coef == "fp8" else (1, 1)
    with CSRCache.from_dicts(d, model, sparsity=sp, coef=coef, window=WINDOW, sink=SINK, block=BLOCK) as cache:
        assert cache.layers[0].k.fmt == codec.coef_side(coef, "k")
        out = model.generate(input_ids=ids, max_new_tokens=11, min_new_tokens=11, do_sample=False, past_key_values=cache)
        cache.save(path)
        want = _feed(model, cache, more, 1)
    hd = csrfile.open_csr(path).header
    assert (hd.config.coef, hd.version) == ((coef, 1) if coef == "fp8" else (coef, 5))
    with CSRCache.from_csr(path, d, model, block=BLOCK) as resumed:
        got = _feed(model, resumed, more, 1)
    exact = DynamicCache()
    with torch.no_grad():
        model(input_ids=out[:, :-1], past_key_values=exact, use_cache=True)  # the same tokens, uncompressed
    coding = float((_feed(model, exact, more, 1) - want).abs().max())
    assert 0 < float((got - want).abs().max()) < 0.05 * coding


@pytest.mark.parametrize("key_space", ["post-rope", "pre-rope"])
def test_decompress_gives_the_caches_reconstruction(key_space, tmp_path):
    """The saved file decompresses (read_csr, as csrtool decompress) to what the live cache stands for; the header is compress's."""
    model = tiny_model("qwen2")
    ids = torch.randint(0, 256, (1, 45), generator=torch.Generator().manual_seed(10))
    d = file_dicts(key_space, n=1024)  # indices held split-packed in memory, 10 bits in the file
    path = tmp_path / "c.csr"
    with generated_cache(model, d, ids, "fp16") as cache:
        assert cache.layers[0].k.packed
        cache.save(path, model_name="tiny-qwen2")
        views = [dense_view(cache, i) for i in range(2)]
    hd = csrfile.open_csr(path).header
    assert (hd.model, hd.key_space, hd.cache_key_space, hd.n_atoms, hd.dict_fingerprint) == ("tiny-qwen2", key_space, "post-rope", 1024, d.fingerprint)
    assert (hd.config.window, hd.config.sink, hd.config.sparsity_k, hd.config.coef, hd.layers[0]) == (WINDOW, SINK, 2, "fp16", (1, 2, 55, 8, 8))
    assert (hd.rope is None) == (key_space == "post-rope")
    restored = csrfile.read_csr(path, d)
    for i, (k, v) in enumerate(views):
        torch.testing.assert_close(restored.keys[i], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(restored.values[i], v, rtol=1e-5, atol=1e-5)
    assert restored.meta["position_offset"] == 0 and restored.meta["tokens"] == 55


def test_per_layer_plan_is_written_as_version_2(tmp_path):
    """A cache resumed from a file keeps its per-layer plan; saving it again writes the same plan (and the same codes)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(11))
    d = file_dicts("post-rope")
    first, second = tmp_path / "a.csr", tmp_path / "b.csr"
    cache = CSRCache.from_dicts(d, model, sparsity=(2, 1), coef="fp16", window=WINDOW, sink=SINK, block=BLOCK)
    cache.layers[1].k.sparsity, cache.layers[1].v.sparsity = 3, 2  # as from_csr sets a file's per-layer plan
    with cache:
        model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, past_key_values=cache)
        cache.save(first)
    hd = csrfile.open_csr(first).header
    assert hd.version == 2 and hd.config.layer_sparsity == ((2, 1), (3, 2)) and (hd.config.sparsity_k, hd.config.sparsity_v) == (3, 2)
    with CSRCache.from_csr(first, d, model, block=BLOCK) as resumed:
        resumed.save(second)
    assert first.read_bytes() == second.read_bytes()


def test_cannot_save_unequal_padding_sliding_layers_or_nothing(tmp_path):
    path = tmp_path / "c.csr"
    model = tiny_model("llama")
    ids, mask = padded_batch(30)
    d = file_dicts("post-rope")
    with CSRCache.from_dicts(d, model, sparsity=(2, 1)) as cache:
        with pytest.raises(CsrError, match="holds no tokens"):
            cache.save(path)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, past_key_values=cache)
        tokens = cache.layers[0].k.tokens
        with pytest.raises(CsrError, match="different left padding"):
            cache.save(path)
        assert cache.layers[0].k.tokens == tokens  # refused before anything was coded
    gemma = tiny_model("gemma3")
    with CSRCache.from_dicts(d, gemma, sparsity=(2, 1)) as cache:
        gemma.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, past_key_values=cache)
        with pytest.raises(CsrError, match="sliding-window layers"):
            cache.save(path)
    with CSRCache.from_dicts(tiny_dicts("post-rope"), model, sparsity=(2, 1)) as cache:  # keys shared, values per head
        model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, past_key_values=cache)
        with pytest.raises(CsrError, match="mixes head/layer scopes"):
            cache.save(path)
    assert list(tmp_path.iterdir()) == []  # nothing half written


def test_equal_padding_offset_and_rope_in_header(tmp_path):
    """A pre-RoPE file records the RoPE the key codes need, at position offset 0 for an unpadded batch."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(12))
    path = tmp_path / "c.csr"
    with generated_cache(model, file_dicts("pre-rope"), ids, "int8", new=3) as cache:
        cache.save(path)
    hd = csrfile.open_csr(path).header
    info = rope_info(model)
    assert hd.rope is not None and hd.rope.position_offset == 0 and list(hd.rope.inv_freq) == pytest.approx(info["inv_freq"])
    assert hd.layers[0][:3] == (2, 2, 22) and hd.config.coef == "int8"
