"""CSRCache: generation on a cache held as sparse codes (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from csrtool import codec
from csrtool.cache import CSRCache
from csrtool.errors import CsrError
from csrtool.eval import runner
from csrtool.eval.csr import CSR
from csrtool.formats import csrsection
from csrtool.formats.dicts import DictSet, fingerprint
from csrtool.models import rope_info
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 7


def tiny_dicts(key_space: str, n: int = 64, seed: int = 0, centred: bool = False) -> DictSet:
    """Random unit dictionaries for the tiny models (head_dim 8, 2 KV heads): shared keys, per-head values split in 2."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        a = torch.randn(*shape, generator=g)
        return a / a.norm(dim=-1, keepdim=True)

    atoms, means = {}, {}
    for layer in range(2):
        atoms[f"layer.{layer}.k"] = unit(1, 1, n, 8)
        atoms[f"layer.{layer}.v"] = unit(2, 2, n, 4)
        if centred:
            means[f"layer.{layer}.k"] = 0.1 * torch.randn(1, 8, generator=g)
            means[f"layer.{layer}.v"] = 0.1 * torch.randn(2, 8, generator=g)
    return DictSet(atoms=atoms, source={"key_space": key_space}, means=means)


def padded_batch(t: int = 40, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    return ids, mask


@pytest.mark.parametrize("key_space", ["post-rope", "pre-rope"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_with_exact_codes_equals_plain_generate(arch, key_space):
    """S = head_dim atoms (OMP is exact) and fp16 coefficients: the text is the uncompressed model's, batch 2, left padding, GQA."""
    model = tiny_model(arch)
    ids, mask = padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    plain = model.generate(**kw)
    with CSRCache.from_dicts(tiny_dicts(key_space, centred=True), model, sparsity=(8, 4), coef="fp16", block=3) as cache:
        out = model.generate(**kw, past_key_values=cache)
        layer = cache.layers[0]
        assert layer.k.tokens >= 40 + 30 - 1 - codec.DEFAULT_WINDOW - codec.DEFAULT_SINK - 3  # most of the history is coded
        assert layer.k.idx.dtype == torch.uint8 and layer.k.q.dtype == torch.float16
    assert torch.equal(out, plain)


def test_gemma3_sliding_layer_stays_dense_full_layer_coded():
    """Gemma 3: the sliding-window layer is transformers' own (dense, at most its window), the global layer is coded."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    model = tiny_model("gemma3")
    ids, mask = padded_batch(40)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    plain = model.generate(**kw)
    with CSRCache.from_dicts(tiny_dicts("post-rope"), model, sparsity=(8, 4), coef="fp16", block=2) as cache:
        out = model.generate(**kw, past_key_values=cache)
        assert isinstance(cache.layers[0], DynamicSlidingWindowLayer) and cache.layers[1].k.tokens > 40
    assert torch.equal(out, plain)


def test_gemma3_pre_rope_codes_hold_each_layers_pre_rope_keys():
    """Gemma 3 with pre-RoPE dictionaries: the full layer (theta 1,000,000, not the sliding layer's 10,000) is coded
    with its own rotation: exact codes give the plain text, and they decode to the layer's own pre-RoPE keys."""
    from csrtool.collect import capture_kv
    from csrtool.engine.history import reconstruct

    model = tiny_model("gemma3")
    ids, mask = padded_batch(40)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    plain = model.generate(**kw)
    with CSRCache.from_dicts(tiny_dicts("pre-rope", centred=True), model, sparsity=(8, 4), coef="fp16", block=2) as cache:
        out = model.generate(**kw, past_key_values=cache)
        layer = cache.layers[1]
        assert layer.rope.inv_freq.tolist() == pytest.approx(rope_info(model)["layers"][0]["inv_freq"])
        coded = reconstruct(layer.k.codes())[0]  # sequence 0 (no padding): positions n_sink.. of its tokens
    assert torch.equal(out, plain)
    pre, _ = capture_kv(model, out[:1], "pre-rope", rope_info(model))
    t0, tc = layer.n_sink, coded.shape[1]
    assert tc > 40
    assert torch.allclose(coded, pre[1][0, :, t0 : t0 + tc], atol=2e-3)


def _dynamic_rope_llama():
    """A tiny Llama whose RoPE changes with the sequence length (no fixed inverse)."""
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    cfg = tiny_config("llama")
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_sampling_with_exact_codes_equals_plain_sampling():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=True, top_k=0)
    torch.manual_seed(5)
    plain = model.generate(**kw)
    with CSRCache.from_dicts(tiny_dicts("post-rope"), model, sparsity=(8, 4), coef="fp16", block=2) as cache:
        torch.manual_seed(5)
        out = model.generate(**kw, past_key_values=cache)
    assert torch.equal(out, plain)


def test_lossy_codes_change_the_text():
    """At 1 atom per vector the cache is really used: the scores differ from the uncompressed model's."""
    model = tiny_model("llama")
    ids, mask = padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(**kw)
    with CSRCache.from_dicts(tiny_dicts("post-rope"), model, sparsity=(1, 1), block=4) as cache:
        out = model.generate(**kw, past_key_values=cache)
    diff = max(float((a - b).nan_to_num(0.0).abs().max()) for a, b in zip(out.scores, plain.scores))  # -inf - -inf: eos held back
    assert diff > 1e-2


def _feed(model, cache, ids, chunk):
    """Logits [B, T, V] of ids fed in chunks through `cache` (None: a DynamicCache)."""
    from transformers import DynamicCache

    cache = DynamicCache() if cache is None else cache
    rows = []
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            rows.append(model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True).logits.float())
    return torch.cat(rows, 1)


@pytest.mark.parametrize("key_space", ["post-rope", "pre-rope"])
def test_codes_attention_equals_reference(key_space):
    """Attention on the codes (engine.attend) vs reconstruct-then-attend, lossy fp8 codes, batch 2 with padding."""
    model = tiny_model("qwen2")
    ids, _ = padded_batch(60)
    d = tiny_dicts(key_space, centred=True)
    outs = []
    for reference in (False, True):
        with CSRCache.from_dicts(d, model, sparsity=(2, 1), block=5, reference=reference) as cache:
            outs.append(_feed(model, cache, ids, 7))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key_space,coef", [("post-rope", "fp8"), ("pre-rope", "fp8"), ("pre-rope", "int4/fp8")])
def test_chunked_pass_equals_eval_runner(key_space, coef):
    """block=1: tokens are coded exactly when eval's CompressedFeed.age codes them, by the same codec calls.
    Tolerance 1e-4 on the logits: eval decodes and attends with sdpa, the cache attends on the codes (float32 sums in another order)."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, 96), generator=g)
    d = tiny_dicts(key_space, centred=True)
    chunk, window, sink = 16, 8, 4
    sp = (1, 1) if coef == "int4/fp8" else (2, 1)  # int4 holds up to Dc/8 atoms: 1 of the keys' 8 channels
    method = CSR(d, 2, 2, 8, bits=None, sparsity=sp, method="omp", coef=coef, rope_info=rope_info(model))
    feed = runner.CompressedFeed(model, method, window=window, sink=sink)
    with torch.no_grad():
        want = torch.cat([feed.step(ids[:, s : s + chunk])[None] for s in range(0, ids.shape[1], chunk)], 1)
    with CSRCache.from_dicts(d, model, sparsity=sp, coef=coef, window=window, sink=sink, block=1) as cache:
        assert cache.layers[0].k.fmt == codec.coef_side(coef, "k")
        got = _feed(model, cache, ids, chunk)
        assert cache.layers[1].k.tokens == feed.done - sink
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float((got - _feed(model, None, ids, chunk)).abs().max()) > 1e-3  # the codes are lossy: the check has teeth


def test_pre_rope_codes_hold_the_unrotated_keys_at_real_positions():
    """With left padding, coded pre-RoPE keys are the model's k_proj outputs (un-rotated at slot - pad)."""
    model = tiny_model("llama")
    ids, mask = padded_batch(30)
    pre = {}
    def keep_first(module, args, out):
        pre.setdefault(0, out.detach())

    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(keep_first)
    try:
        with CSRCache.from_dicts(tiny_dicts("pre-rope"), model, sparsity=(8, 4), coef="fp16", block=1) as cache:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, past_key_values=cache)
            layer = cache.layers[0]
            from csrtool.engine.attention import reconstruct

            got = reconstruct(layer.k.codes())  # [B, H, Tc, D] in code space
    finally:
        hook.remove()
    b, t, _ = pre[0].shape
    want = pre[0].view(b, t, 2, 8).transpose(1, 2)[:, :, layer.n_sink : layer.n_sink + got.shape[2]]
    real = mask[:, layer.n_sink : layer.n_sink + got.shape[2]].bool()
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[1][:, real[1]], want[1][:, real[1]], rtol=1e-3, atol=1e-3)


def test_nbytes_within_csr_payload():
    """Held bytes (indices uint8 for N=64, fp8 coefficients, a scale per block, dense sink + window) vs the .csr payload."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (1, 200), generator=g)
    d = tiny_dicts("post-rope")
    with CSRCache.from_dicts(d, model, sparsity=(4, 2), block=1) as cache:
        _feed(model, cache, ids, 50)
        held = cache.nbytes()
        assert held["dicts"] == sum(a.numel() * 4 for a in d.atoms.values())
    payload = sum(
        csrsection.section_nbytes((1, 2, 200, 8), 64, 1, 4, "fp8", codec.DEFAULT_WINDOW, torch.float32, codec.DEFAULT_SINK)
        + csrsection.section_nbytes((1, 2, 200, 8), 64, 2, 2, "fp8", codec.DEFAULT_WINDOW, torch.float32, codec.DEFAULT_SINK)
        for _ in range(2)
    )
    assert payload <= held["total"] <= 1.25 * payload, (held, payload)
    dense = 2 * 2 * 2 * 200 * 8 * 4  # what a DynamicCache holds in float32
    assert held["total"] * 3 < dense


def test_nbytes_within_csr_payload_with_packed_indices():
    """N = 1024: 10-bit indices would waste 6 of int16's 16 bits (1.33x the payload); held split-packed, 10 bits."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (1, 200), generator=g)
    with CSRCache.from_dicts(tiny_dicts("post-rope", n=1024), model, sparsity=(4, 2), block=1) as cache:
        _feed(model, cache, ids, 50)
        held = cache.nbytes()
        side = cache.layers[0].k
        assert side.packed and side._idx is None and side.idx.dtype == torch.int16 and int(side.idx.max()) >= 512
    payload = sum(
        csrsection.section_nbytes((1, 2, 200, 8), 1024, 1, 4, "fp8", codec.DEFAULT_WINDOW, torch.float32, codec.DEFAULT_SINK)
        + csrsection.section_nbytes((1, 2, 200, 8), 1024, 2, 2, "fp8", codec.DEFAULT_WINDOW, torch.float32, codec.DEFAULT_SINK)
        for _ in range(2)
    )
    assert payload <= held["total"] <= 1.05 * payload, (held, payload)  # the per-block scales are the difference


def test_indices_are_packed_where_the_integer_type_wastes_over_a_quarter():
    from csrtool.cache import packs_indices

    sizes = (2, 16, 17, 64, 256, 257, 512, 1024, 2048, 2049, 4096, 32768, 65536)
    assert [n for n in sizes if packs_indices(n)] == [2, 16, 257, 512, 1024, 2048]  # 1-4 bits of uint8, 9-11 bits of int16


@pytest.mark.parametrize("key_space", ["post-rope", "pre-rope"])
def test_packed_indices_give_the_uncompressed_text(key_space):
    """Exact codes over 1024 atoms (indices held split-packed, unpacked at every step): plain generate's text."""
    model = tiny_model("qwen2")
    ids, mask = padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    plain = model.generate(**kw)
    with CSRCache.from_dicts(tiny_dicts(key_space, n=1024, centred=True), model, sparsity=(8, 4), coef="fp16", block=3) as cache:
        out = model.generate(**kw, past_key_values=cache)
        assert cache.layers[1].v.packed and cache.layers[1].v.tokens > 40
    assert torch.equal(out, plain)


def test_unsupported_things_raise_clear_errors():
    model = tiny_model("llama")
    ids, mask = padded_batch(20)
    with CSRCache.from_dicts(tiny_dicts("post-rope"), model, sparsity=(2, 1)) as cache:
        with pytest.raises(CsrError, match="beam search"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False, past_key_values=cache)
    with pytest.raises(CsrError, match="make a new CSRCache"):  # closed: the model attends as before, the cache refuses
        _feed(model, cache, ids, 10)
    with pytest.raises(CsrError, match="no fixed RoPE"):
        CSRCache.from_dicts(tiny_dicts("pre-rope"), _dynamic_rope_llama(), sparsity=(2, 1))
    with pytest.raises(CsrError, match="window must be"):
        CSRCache.from_dicts(tiny_dicts("post-rope"), model, sparsity=(2, 1), window=-1)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)  # the model works again
    assert plain.shape == (2, 23)


def test_chunked_prefill_codes_the_prompt_in_blocks():
    """generate(prefill_chunk_size=...): each prompt chunk is coded when the next one comes, in one call per layer side."""
    model = tiny_model("llama")
    ids, _ = padded_batch(40)
    ids = ids[:1]
    kw = dict(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    plain = model.generate(**kw)
    with CSRCache.from_dicts(tiny_dicts("pre-rope"), model, sparsity=(8, 4), coef="fp16", block=8) as cache:
        out = model.generate(**kw, past_key_values=cache, prefill_chunk_size=16)
        blocks = cache.layers[0].k.lengths
    assert torch.equal(out, plain)
    assert blocks[:2] == [16 - codec.DEFAULT_WINDOW - codec.DEFAULT_SINK, 16]  # chunk 1 (less window and sink), then chunk 2


def _per_head(d: DictSet) -> DictSet:
    """Head-scope copies of tiny_dicts' layer-scope tensors (.csr needs one scope for K and V)."""
    per_head = lambda a: a if a.shape[0] == 2 else a.expand(2, *a.shape[1:]).clone()  # noqa: E731
    atoms = {n: per_head(a) for n, a in d.atoms.items()}
    return DictSet(atoms=atoms, source=d.source, means={n: per_head(m) for n, m in d.means.items()}, fingerprint=fingerprint(atoms))


@pytest.mark.parametrize("key_space", ["post-rope", "pre-rope"])
def test_from_csr_continues_like_the_decompressed_file(key_space, tmp_path):
    """compress a prompt's cache to .csr; CSRCache.from_csr holds its codes and continues as a DynamicCache of decompress's output."""
    from transformers import DynamicCache

    from csrtool.formats import csrfile
    from csrtool.formats.kvcache import KVCache

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (1, 60), generator=g)
    d = _per_head(tiny_dicts(key_space, centred=True))
    dyn = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :48], past_key_values=dyn, use_cache=True)
    kv = KVCache([layer.keys for layer in dyn.layers], [layer.values for layer in dyn.layers], {"key_space": "post-rope", "rope": rope_info(model)})
    cfg = codec.CodecConfig(2, 1, "fp8", "omp", window=5, sink=3)
    header = csrfile.make_header(kv, d, cfg)
    path = tmp_path / "c.csr"
    csrfile.write_csr(path, header, csrfile.encode_sections(kv, d, header))
    restored = csrfile.read_csr(path, d)
    ref = DynamicCache()
    for i, (k, v) in enumerate(zip(restored.keys, restored.values)):
        ref.update(k, v, i)
    want = _feed(model, ref, ids[:, 48:], 4)
    with CSRCache.from_csr(path, d, model, block=1000) as cache:  # nothing new is coded: the reference keeps new tokens dense too
        layer = cache.layers[0]
        assert (layer.n_sink, layer.k.tokens, layer.keys.shape[2]) == (3, 40, 5)
        assert cache.get_seq_length() == 48
        got = _feed(model, cache, ids[:, 48:], 4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_two_caches_on_one_model():
    """The attention override stays while any cache of the model is open; each closed cache refuses."""
    from csrtool import cache_attention

    model = tiny_model("llama")
    ids, _ = padded_batch(20)
    a = CSRCache.from_dicts(tiny_dicts("post-rope"), model, sparsity=(8, 4), coef="fp16", block=1)
    b = CSRCache.from_dicts(tiny_dicts("post-rope"), model, sparsity=(8, 4), coef="fp16", block=1)
    a.close()
    assert cache_attention.installed(model)
    with pytest.raises(CsrError, match="make a new CSRCache"):
        _feed(model, a, ids, 10)
    torch.testing.assert_close(_feed(model, b, ids, 10), _feed(model, None, ids, 10), rtol=1e-3, atol=1e-3)
    b.close()
    assert not cache_attention.installed(model) and model.config._attn_implementation == "sdpa"


def test_learnt_padding_keeps_a_files_position_offset():
    """A layer resumed from a .csr file with position_offset p sits at slot - (pad + offset); a mask must not drop p."""
    model = tiny_model("llama")
    with CSRCache.from_dicts(tiny_dicts("pre-rope"), model, sparsity=(2, 1)) as cache:
        layer = cache.layers[0]
        layer.offset = -5  # what cache_file.load sets for position_offset 5
        layer.note_valid(torch.tensor([[True, True, True], [False, True, True]]))
        assert layer.pad.tolist() == [-5, -4]
        layer.keys = torch.zeros(2, 2, 0, 8)
        assert layer.key_pos0().tolist() == [layer.n_sink + 5, layer.n_sink + 4]


def test_from_csr_refuses_an_adaptive_file(tmp_path):
    """CSRCache holds S atoms per vector: a version 4 file (adaptive counts) is refused with the fix, not misread."""
    from transformers import DynamicCache

    from csrtool.formats import csrfile
    from csrtool.formats.kvcache import KVCache

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    d = _per_head(tiny_dicts("post-rope"))
    dyn = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=dyn, use_cache=True)
    kv = KVCache([layer.keys for layer in dyn.layers], [layer.values for layer in dyn.layers], {"key_space": "post-rope", "rope": rope_info(model)})
    header = csrfile.make_header(kv, d, codec.CodecConfig(2, 2, "fp8", "omp", adaptive=True))
    path = tmp_path / "a.csr"
    csrfile.write_csr(path, header, csrfile.encode_sections(kv, d, header))
    with pytest.raises(CsrError, match="adaptive codes .* compress the cache with --fixed"):
        CSRCache.from_csr(path, d, model)
