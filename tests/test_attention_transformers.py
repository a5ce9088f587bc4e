"""Attention on the codes against transformers' own eager attention, inside tiny Llama / Qwen2 / Gemma 3 models.

The model runs a left-padded batch of 2 (prefill, then a chunk of 3 tokens) with eager
attention; every attention call of the chunk is captured with its output and transformers'
own 4-D mask (causal, padding, Gemma 3's sliding window). The history is split into sink,
coded and window tokens and the coded tokens are sparse-coded exactly (S = head_dim atoms,
OMP), so the model's own attention output must equal engine.attention.attend on the codes.
Pre-RoPE: the keys are taken from k_proj (and Gemma 3's k_norm) before the model rotates them,
with each layer's own rotation (Gemma 3's sliding and full layers differ), so the positions
and frequencies `attend` rotates them with are checked against the model's.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from csrtool import codec
from csrtool.engine.attention import Codes, Rope, Segment, attend
from csrtool.keyspace import RopeParams
from csrtool.models import rope_info
from tiny import tiny_model

T0, TQ, SINK, WIN, PAD = 30, 3, 2, 5, 6


def _capture(model):
    """Run the model; return the attention calls of the second (chunked) forward, each with its
    output, the layer's input hidden states of both forwards, and the 2-D padding mask."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    eager = importlib.import_module(type(model).__module__).eager_attention_forward
    calls, hidden = [], {}

    def capture(module, query, key, value, attention_mask, **kw):
        out = eager(module, query, key, value, attention_mask, **kw)
        calls.append((module, query, key, value, kw, out[0]))
        return out

    def keep_hidden(module, args, kwargs):
        hidden.setdefault(module.layer_idx, []).append(kwargs.get("hidden_states", args[0] if args else None))

    AttentionInterface.register("csrtool_test_capture", capture)
    AttentionMaskInterface.register("csrtool_test_capture", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model.config._attn_implementation = "csrtool_test_capture"
    hooks = [layer.self_attn.register_forward_pre_hook(keep_hidden, with_kwargs=True) for layer in model.model.layers]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, T0 + TQ), generator=gen)
    mask = torch.ones(2, T0 + TQ, dtype=torch.long)
    mask[1, :PAD] = 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # as generate() does
    cache = DynamicCache()  # full layers: the sliding window comes from the mask only
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :T0], attention_mask=mask[:, :T0], position_ids=pos[:, :T0], past_key_values=cache, use_cache=True)
            calls.clear()
            model(input_ids=ids[:, T0:], attention_mask=mask, position_ids=pos[:, T0:], past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return calls, {i: torch.cat(h, 1) for i, h in hidden.items()}, mask.bool()


def _code(x: torch.Tensor, gen: torch.Generator) -> Codes:
    """Exact codes of x [B, H, T, D]: S = D atoms of a random per-head dictionary, centred."""
    b, h, t, d = x.shape
    atoms = torch.randn(h, 1, 2 * d, d, generator=gen, dtype=torch.float64)
    atoms = atoms / atoms.norm(dim=-1, keepdim=True)
    mean = x.mean(dim=(0, 2))  # [H, D]
    idx, coef = codec.encode_codes(x.double() - mean[None, :, None, :], atoms, d, "omp")
    return Codes(idx.to(torch.int16), coef.float(), atoms.float(), None, mean)


@pytest.mark.parametrize("key_space", ["post-rope", "pre-rope"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_codes_match_transformers_eager(arch, key_space):
    model = tiny_model(arch, layers=2)
    calls, hidden, valid = _capture(model)
    assert len(calls) == 2
    gen = torch.Generator().manual_seed(1)
    windows = set()
    for module, q, k, v, kw, want in calls:
        t = k.shape[2]
        assert t == T0 + TQ
        tc = t - SINK - WIN
        kc, extra = k[:, :, SINK : SINK + tc], {}
        if key_space == "pre-rope":  # the keys before the model rotated them (Gemma 3: k_norm'ed), with the layer's own rotation
            b, d = k.shape[0], k.shape[3]
            k_pre = module.k_proj(hidden[module.layer_idx]).view(b, t, -1, d).transpose(1, 2)
            if hasattr(module, "k_norm"):
                k_pre = module.k_norm(k_pre)
            kc = k_pre[:, :, SINK : SINK + tc].detach()
            rp = RopeParams.from_meta({"rope": rope_info(model)}).for_layer(module.layer_idx)
            extra = dict(rope=Rope(torch.tensor(rp.inv_freq), rp.scaling), key_pos0=torch.tensor([SINK, SINK - PAD]))
        keys, values = _code(kc, gen), _code(v[:, :, SINK : SINK + tc], gen)
        window = getattr(module, "sliding_window", None)
        windows.add(window)
        dense = [Segment(k[:, :, :SINK], v[:, :, :SINK], 0), Segment(k[:, :, SINK + tc :], v[:, :, SINK + tc :], SINK + tc)]
        got = attend(q, keys, values, dense, SINK, valid=valid, q_start=T0, window=window, scale=kw["scaling"], **extra)
        torch.testing.assert_close(got.transpose(1, 2), want, rtol=1e-4, atol=2e-5)
    if arch == "gemma3":
        assert windows == {None, 16}  # one sliding-window layer and one global layer were compared
