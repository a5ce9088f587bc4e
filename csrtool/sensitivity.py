"""How much the model's output moves when one layer's keys or values are coded.

Coding a single layer's keys (or values) at the same sparsity costs anywhere from
nothing to several points of perplexity on SmolLM2, depending on the layer
(docs/quality.md §5). `layer_sensitivity` measures it directly on a calibration
window: one forward pass per (layer, kind), in which that layer's attention sees
coded keys (or values) for every token farther back than `recent` positions
(except the first `sink`), as in a compressed cache with a full-precision window,
and the KL divergence of the next-token distributions to the exact pass is
recorded. Gradient (Fisher) estimates were tried first and rank layers badly:
the softmax is far from linear for the few keys a head attends to.

    layer_sensitivity(model, ids [1, T], method, recent, sink, progress) -> {(layer, 'k'|'v'): KL}

`method` is anything with `reconstruct(layer, kind, x [B, H, T, D], positions)`
(csrtool.eval.csr.CSR at a reference sparsity).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


def _mixed_attention(module, query, key, value, attention_mask, *, coded, recent: int, sink: int, scaling=None, **_):
    """Eager causal attention where query i sees the coded key/value of token j when i - j >= recent and j >= sink."""
    k_hat, v_hat = coded
    b, hq, t, d = query.shape
    rep = hq // key.shape[1]
    k, v, k_hat, v_hat = (x.repeat_interleave(rep, dim=1) for x in (key, value, k_hat, v_hat))
    scale = scaling if scaling is not None else module.scaling
    i = torch.arange(t, device=query.device)[:, None]
    j = torch.arange(key.shape[2], device=query.device)[None, :]
    far = ((i - j) >= recent) & (j >= sink)
    logits = torch.where(far, query @ k_hat.transpose(-1, -2), query @ k.transpose(-1, -2)) * scale
    p = torch.softmax(logits.masked_fill(j > i, float("-inf")), dim=-1)
    out = (p * ~far) @ v + (p * far) @ v_hat
    return out.transpose(1, 2).contiguous(), None


def _dispatch(inner, state: dict, module, query, key, value, attention_mask, **kwargs):
    if state.get("layer") != module.layer_idx:
        return inner(module, query, key, value, attention_mask, **kwargs)
    pos = torch.arange(key.shape[2], device=key.device)
    x = key if state["kind"] == "k" else value
    x_hat = state["method"].reconstruct(module.layer_idx, state["kind"], x, pos).to(x.dtype)
    coded = (x_hat, value) if state["kind"] == "k" else (key, x_hat)
    return _mixed_attention(module, query, key, value, attention_mask, coded=coded, recent=state["recent"], sink=state["sink"], **kwargs)


@torch.no_grad()
def layer_sensitivity(
    model, input_ids: torch.Tensor, method, recent: int = 64, sink: int = 4, progress: Callable[[int, str], None] | None = None,
) -> dict[tuple[int, str], float]:
    """Mean KL(exact ‖ coded) of the next-token distributions of ids [1, T], per (layer, kind)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    state: dict = {"recent": recent, "sink": sink, "method": method}
    name = "csrtool_sensitivity"
    AttentionInterface.register(name, functools.partial(_dispatch, sdpa_attention_forward, state))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    orig = model.config._attn_implementation
    n_layers = len(model.model.layers)
    out: dict[tuple[int, str], float] = {}
    try:
        model.config._attn_implementation = name
        ref = torch.log_softmax(model(input_ids=input_ids, use_cache=False).logits[0].float(), dim=-1)
        for layer in range(n_layers):
            for kind in ("k", "v"):
                state.update(layer=layer, kind=kind)
                lp = torch.log_softmax(model(input_ids=input_ids, use_cache=False).logits[0].float(), dim=-1)
                out[(layer, kind)] = float((ref.exp() * (ref - lp)).sum(-1).mean())
                if progress:
                    progress(layer, kind)
    finally:
        state.pop("layer", None)
        model.config._attn_implementation = orig
    return out
