"""Run a function of ours in place of the model's attention, for the duration of a block.

    with attention_override(model, fn, inner=None) as name:
        ...                                   # every attention call of `model` goes through fn
    fn(inner, module, query, key, value, attention_mask, **kwargs) -> (out, weights)
    inner_attention(model, inner=None) -> (attention fn, mask fn) or None when unsupported
    supported(model) -> bool                  the model's implementation can be wrapped

`inner` is the implementation fn wraps ('sdpa' or 'eager'); None takes the
model's current one. Inside an override the current one is that override, so
overrides nest: the innermost fn sees the outer override as its `inner`. The
override is registered under a fresh name through transformers'
AttentionInterface / AttentionMaskInterface (the mask is the inner
implementation's), the model's `config._attn_implementation` points at it while
the block runs, and both are restored (and the name unregistered) in `finally`.
Flash and flex kernels are not wrapped: attention_override raises CsrError,
`supported` says so beforehand.
"""

from __future__ import annotations

import functools
import itertools
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from csrtool.errors import CsrError

_PREFIX = "csrtool_attention_"
_serial = itertools.count()


def _eager(model) -> Callable | None:
    """The eager attention function of the model's own modeling module (transformers defines one per model)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "eager_attention_forward", None)


def inner_attention(model, inner: str | None = None) -> tuple[Callable, Callable] | None:
    """(attention fn, mask fn) of implementation `inner` (None: the model's current), or None if it cannot be wrapped."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = inner or getattr(model.config, "_attn_implementation", None)
    if name == "eager":
        fn = _eager(model)
        return None if fn is None else (fn, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    if name == "sdpa" or (isinstance(name, str) and name.startswith(_PREFIX)):  # sdpa, or an enclosing override
        return AttentionInterface()[name], ALL_MASK_ATTENTION_FUNCTIONS[name]
    return None


def supported(model) -> bool:
    return inner_attention(model) is not None


@contextmanager
def attention_override(model, fn: Callable, inner: str | None = None) -> Iterator[str]:
    """Route the model's attention calls through fn(inner_fn, module, query, key, value, attention_mask, **kwargs)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if inner not in (None, "sdpa", "eager"):
        raise CsrError(f"attention override: inner implementation must be 'sdpa' or 'eager', got {inner!r}")
    found = inner_attention(model, inner)
    orig = getattr(model.config, "_attn_implementation", None)
    if found is None:
        raise CsrError(
            f"{type(model).__name__} runs attention with {inner or orig!r}, which csrtool cannot wrap: "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    attn, mask = found
    name = f"{_PREFIX}{next(_serial)}"
    AttentionInterface.register(name, functools.partial(fn, attn))
    AttentionMaskInterface.register(name, mask)
    try:
        model.config._attn_implementation = name
        yield name
    finally:
        model.config._attn_implementation = orig
        AttentionInterface._global_mapping.pop(name, None)  # no public unregister; keep no reference to fn
        AttentionMaskInterface._global_mapping.pop(name, None)
