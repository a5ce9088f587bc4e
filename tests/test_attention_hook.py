"""attention_override: routes every attention call through fn, nests, restores and unregisters."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from csrtool.attention_hook import attention_override, supported
from csrtool.errors import CsrError
from tiny import tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_override_sees_every_layer_and_changes_nothing(impl):
    model = tiny_model()
    model.config._attn_implementation = impl
    ids = torch.arange(3, 23)[None]
    ref = _logits(model, ids)
    seen = []

    def fn(inner, module, *args, **kwargs):
        seen.append(module.layer_idx)
        return inner(module, *args, **kwargs)

    with attention_override(model, fn) as name:
        assert model.config._attn_implementation == name
        out = _logits(model, ids)
    assert seen == [0, 1]
    assert torch.equal(out, ref)
    assert model.config._attn_implementation == impl
    assert name not in AttentionInterface._global_mapping and name not in AttentionMaskInterface._global_mapping


def test_nested_overrides_compose_and_restore_on_error():
    model = tiny_model()
    model.config._attn_implementation = "sdpa"
    ids = torch.arange(3, 13)[None]
    ref = _logits(model, ids)
    calls = []

    def tag(label):
        def fn(inner, module, query, key, value, mask, **kwargs):
            calls.append(label)
            out, w = inner(module, query, key, value, mask, **kwargs)
            return (out * 2, w) if label == "outer" else (out, w)
        return fn

    with pytest.raises(RuntimeError, match="boom"):
        with attention_override(model, tag("outer")) as outer:
            with attention_override(model, tag("inner")):
                out = _logits(model, ids)
            assert model.config._attn_implementation == outer
            raise RuntimeError("boom")
    assert calls == ["inner", "outer", "inner", "outer"]  # inner wraps outer, per layer
    assert not torch.allclose(out, ref)  # the outer override really ran
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, ids), ref)


def test_unsupported_implementation_is_refused():
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    assert not supported(model)
    with pytest.raises(CsrError, match="cannot wrap.*attn_implementation='sdpa'"):
        with attention_override(model, lambda inner, *a, **k: inner(*a, **k)):
            pass
    assert model.config._attn_implementation == "flash_attention_2"
    with pytest.raises(CsrError, match="must be 'sdpa' or 'eager'"):
        with attention_override(model, lambda inner, *a, **k: inner(*a, **k), inner="flex"):
            pass
