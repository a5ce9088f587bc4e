"""Attention on a CSRCache's codes inside a transformers model.

    release = install(model)     # attention_hook.install(model, csr_attention), counted per model
    installed(model) -> bool
    release()                    # the model's own implementation again, once every cache released it

The registered function looks at the key tensor it is given: a CSRLayer's update marks
the dense tail it returns with the layer (`key._csr_layer`); for those calls it attends
over sink + codes + tail with engine.attention.attend (attend_reference when the cache
was made with reference=True), then lets the layer code the tokens that left its window
(CSRLayer.age), so a prompt is coded inside its own prefill step. Any other call (another
cache, no cache) goes to the implementation it wraps (sdpa or eager), so leaving it
installed changes nothing else.

The mask is the original implementation's (AttentionMaskInterface); the 2-D padding mask
the engine needs is its last query row (that query sees every earlier key of its sequence).
"""

from __future__ import annotations

import torch

from csrtool import attention_hook
from csrtool.attention_hook import current
from csrtool.engine.attention import Segment, attend, attend_reference
from csrtool.errors import CsrError

PREFIX = attention_hook.FAMILY + "csr_"


def _valid(mask: torch.Tensor | None, slots: int) -> torch.Tensor | None:
    """bool [B, slots] (False = padding) from the model's 4-D mask, or None when it has none."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise CsrError(f"CSRCache got a {mask.dim()}-D attention mask from the model; it needs the sdpa/eager 4-D mask")
    row = mask[:, 0, -1, :slots]
    return row if row.dtype == torch.bool else row == 0


def csr_attention(inner, module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """transformers attention: [B, Hq, Tq, D] queries -> ([B, Tq, Hq, D], None)."""
    layer = getattr(key, "_csr_layer", None)
    if layer is None:
        return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, sliding_window=sliding_window, **kwargs)
    if sliding_window is not None:
        raise CsrError("CSRCache layers do not support sliding-window attention yet")
    valid = _valid(attention_mask, layer.tokens)
    layer.note_valid(valid)
    tq = query.shape[2]
    cache = layer.cache
    if not layer.k.tokens and not cache.reference:  # nothing coded yet (a prompt's prefill): the slots are sink + tail, dense
        k_all, v_all = torch.cat([layer.sink_k, key], 2), torch.cat([layer.sink_v, value], 2)
        out = inner(module, query, k_all, v_all, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer.age(cache.block)  # code what left the window now: the step's attention has read it dense, as eval does
        return out
    dense = [Segment(layer.sink_k, layer.sink_v, 0), Segment(key, value, layer.tail_start)]
    keys = values = None
    if layer.k.tokens:
        keys, values = layer.codes()
    fn = attend_reference if cache.reference else attend
    out = fn(
        query, keys, values, dense, layer.n_sink,
        rope=layer.rope if keys is not None else None, key_pos0=layer.key_pos0() if keys is not None else None,
        valid=valid, q_start=layer.tokens - tq, scale=scaling,
    )
    layer.age(cache.block)
    return out.transpose(1, 2).contiguous(), None


def installed(model) -> bool:
    return str(current(model)).startswith(PREFIX)


_USERS: dict[int, list] = {}  # id(model) -> [open caches, release]


def install(model):
    """Route the model's attention through csr_attention (attention_hook.install); returns a function that
    undoes it once every cache that installed it on this model has called its own."""
    key = id(model)
    if key in _USERS and installed(model):
        _USERS[key][0] += 1
    else:
        _USERS[key] = [1, attention_hook.install(model, csr_attention, prefix=PREFIX)]
    done = []

    def release() -> None:
        if done:
            return
        done.append(True)
        entry = _USERS.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            entry[1]()
            del _USERS[key]

    return release
