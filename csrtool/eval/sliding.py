"""Sliding-window attention layers (Gemma 2/3, Mistral-style) in the eval's compressed cache.

A sliding layer's cache (transformers' DynamicSlidingWindowLayer) holds only the
last `sliding_window - 1` tokens; older ones are dropped by the model itself,
with or without compression. So in a sliding layer the eval compresses a token
when it leaves the full-precision window (as in every layer) *if the layer
still holds it*, and it stays compressed until the layer drops it. Tokens the
layer has already dropped are never compressed (nothing is stored for them).
Full-attention layers are handled as before: every token older than the window,
except the sink tokens, is compressed once and kept.

Reconstruction errors cover every vector compressed, in both kinds of layer;
attention fidelity is measured in full-attention layers only.

    check_layers(model, cache)     CsrError for cache layers the eval cannot address
    first_held(layer, pos)         sequence position of the first token a layer holds
    has_sliding(model)             whether any layer slides (transformers' QuantizedCache refuses them)
"""

from __future__ import annotations

from csrtool.errors import CsrError


def check_layers(model, cache) -> None:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    bad = sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)})
    if bad:
        raise CsrError(
            f"{type(model).__name__} uses cache layers of type {', '.join(bad)}, which csrtool eval cannot address by position: "
            "it supports full-attention and sliding-window layers"
        )


def first_held(layer, pos: int) -> int:
    """Position of the first token `layer` holds after `pos` tokens were fed (0 for a full layer)."""
    if not getattr(layer, "is_sliding", False) or layer.keys is None:
        return 0
    held = int(layer.keys.shape[2])
    assert held <= pos, (held, pos)
    return pos - held


def has_sliding(model) -> bool:
    from transformers import DynamicCache

    return any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.config).layers)
