"""Run a function of ours in place of the model's attention, for the duration of a block.

    with attention_override(model, fn, inner=None) as name:
        ...                                   # every attention call of `model` goes through fn
    release = install(model, fn, inner=None)  # the same, until release() (an override that outlives a block)
    fn(inner, module, query, key, value, attention_mask, **kwargs) -> (out, weights)
    inner_attention(model, inner=None) -> (attention fn, mask fn) or None when unsupported
    supported(model) -> bool                  the model's implementation can be wrapped
    with suspended(model): ...                a side pass inside an override, unobserved (plain sdpa)

`inner` is the implementation fn wraps ('sdpa' or 'eager'); None takes the
model's current one. Inside an override the current one is that override, so
overrides nest: the innermost fn sees the outer override as its `inner`. The
override is registered under a fresh name through transformers'
AttentionInterface / AttentionMaskInterface (the mask is the inner
implementation's), the model's `config._attn_implementation` (and its decoder
config's, where a multimodal config nests one) points at it while the block runs,
and both are restored (and the name unregistered) in `finally` / by `release()`.
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

FAMILY = "csrtool_"  # every implementation name csrtool registers starts with this
_PREFIX = FAMILY + "attention_"
_serial = itertools.count()


def _eager(model) -> Callable | None:
    """The eager attention function of the model's own modeling module (transformers defines one per model)."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "eager_attention_forward", None)


def inner_attention(model, inner: str | None = None) -> tuple[Callable, Callable] | None:
    """(attention fn, mask fn) of implementation `inner` (None: the model's current), or None if it cannot be wrapped."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = inner or current(model) or "eager"  # no name: transformers runs its eager path
    if name == "eager":
        fn = _eager(model)
        return None if fn is None else (fn, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    if name == "sdpa" or (isinstance(name, str) and name.startswith(FAMILY)):  # sdpa, or an enclosing override of ours
        return AttentionInterface()[name], ALL_MASK_ATTENTION_FUNCTIONS[name]
    return None


def supported(model) -> bool:
    return inner_attention(model) is not None


def _configs(model) -> list:
    """The model's config and its decoder config when a multimodal config nests one (both name the implementation)."""
    from csrtool.models import text_config

    top = model.config
    inner = text_config(top)
    return [top] if inner is top else [top, inner]


def install(model, fn: Callable, inner: str | None = None, prefix: str = _PREFIX) -> Callable[[], None]:
    """Route the model's attention calls through fn(inner_fn, module, query, key, value, attention_mask, **kwargs)
    until the returned function is called (it restores the previous implementation and unregisters fn's name).

    The open/close form of attention_override, for an override that outlives a block (CSRCache)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if inner not in (None, "sdpa", "eager"):
        raise CsrError(f"attention override: inner implementation must be 'sdpa' or 'eager', got {inner!r}")
    configs = _configs(model)
    orig = [getattr(c, "_attn_implementation", None) for c in configs]
    found = inner_attention(model, inner)
    if found is None:
        raise CsrError(
            f"{type(model).__name__} runs attention with {inner or orig[0]!r}, which csrtool cannot wrap: "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    attn, mask = found
    name = f"{prefix}{next(_serial)}"
    AttentionInterface.register(name, functools.partial(fn, attn))
    AttentionMaskInterface.register(name, mask)
    for c in configs:
        c._attn_implementation = name
    done = []

    def release() -> None:
        if done:
            return
        done.append(True)
        for c, o in zip(configs, orig):
            c._attn_implementation = o
        AttentionInterface._global_mapping.pop(name, None)  # no public unregister; keep no reference to fn
        AttentionMaskInterface._global_mapping.pop(name, None)

    return release


def current(model) -> str | None:
    """The attention implementation the model's (decoder) config names now."""
    return getattr(_configs(model)[-1], "_attn_implementation", None)


@contextmanager
def attention_override(model, fn: Callable, inner: str | None = None) -> Iterator[str]:
    """Route the model's attention calls through fn(inner_fn, module, query, key, value, attention_mask, **kwargs)."""
    release = install(model, fn, inner)
    try:
        yield current(model)
    finally:
        release()


@contextmanager
def suspended(model) -> Iterator[None]:
    """Run a side computation of the model (csrtool.predictor's) with plain sdpa attention while an override of ours
    is installed, so the override never sees it; a no-op when none is."""
    configs = _configs(model)
    orig = [getattr(c, "_attn_implementation", None) for c in configs]
    ours = any(isinstance(o, str) and o.startswith(FAMILY) for o in orig)
    try:
        if ours:
            for c in configs:
                c._attn_implementation = "sdpa"
        yield
    finally:
        for c, o in zip(configs, orig):
            c._attn_implementation = o
