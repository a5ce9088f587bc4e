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

`method` is anything with `reconstruct(layer, kind, x [B, H, T, D], positions, ids)`
(csrtool.reconstruct.Reconstructor at a reference sparsity).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from csrtool.attention_hook import attention_override


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


def _dispatch(state: dict, inner, module, query, key, value, attention_mask, **kwargs):
    if state.get("layer") != module.layer_idx:
        return inner(module, query, key, value, attention_mask, **kwargs)
    pos = torch.arange(key.shape[2], device=key.device)
    x = key if state["kind"] == "k" else value
    x_hat = state["method"].reconstruct(module.layer_idx, state["kind"], x, pos, state["ids"][:, : key.shape[2]]).to(x.dtype)
    coded = (x_hat, value) if state["kind"] == "k" else (key, x_hat)
    return _mixed_attention(module, query, key, value, attention_mask, coded=coded, recent=state["recent"], sink=state["sink"], **kwargs)


class _Replay:
    """Re-run the decoder from layer l onward on the hidden states the exact pass gave it.

    Layers before the coded one compute exactly what the exact pass computed, so a
    pass per (layer, kind) needs only the layers from l on: about half the work.
    The inputs of every decoder layer are recorded by pre-hooks during the exact pass;
    `usable` is False (callers then run whole passes) unless replaying from layer 0
    reproduces the model's own logits, which checks norm/lm_head handling per model."""

    def __init__(self, model, input_ids: torch.Tensor):
        self.model = model
        self.inputs: dict[int, tuple] = {}
        layers = model.model.layers
        hooks = [layer.register_forward_pre_hook(functools.partial(self._record, i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            self.logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
        finally:
            for h in hooks:
                h.remove()
        self.usable = len(self.inputs) == len(layers)
        if self.usable:
            again = self.run(0)
            self.usable = again is not None and bool(torch.allclose(again, self.logits, rtol=1e-4, atol=1e-4))

    def _record(self, i: int, module, args, kwargs):
        self.inputs[i] = (args, dict(kwargs))

    def run(self, start: int) -> torch.Tensor | None:
        """Logits [T, V] with decoder layers start.. re-run (None if this model's head is unknown)."""
        m = self.model
        norm, head = getattr(m.model, "norm", None), getattr(m, "lm_head", None)
        if norm is None or head is None:
            return None
        args, kwargs = self.inputs[start]
        h = args[0] if args else kwargs["hidden_states"]  # recorded inputs stay intact for the next run
        for i in range(start, len(m.model.layers)):
            a, kw = self.inputs[i]
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            out = m.model.layers[i](h, *a[1:], **kw)
            h = out[0] if isinstance(out, tuple) else out
        return head(norm(h))[0].float()


@torch.no_grad()
def layer_sensitivity(
    model, input_ids: torch.Tensor, method, recent: int = 64, sink: int = 4, progress: Callable[[int, str], None] | None = None,
    replay: bool = True, layers: list[int] | None = None,
) -> dict[tuple[int, str], float]:
    """Mean KL(exact ‖ coded) of the next-token distributions of ids [1, T], per (layer, kind) of `layers` (default all).

    replay=False runs every pass through the whole model (the reference for _Replay). Each layer's
    KL depends only on that layer, so a torchrun job can split `layers` across ranks."""
    state: dict = {"recent": recent, "sink": sink, "method": method, "ids": input_ids}
    n_layers = len(model.model.layers)
    out: dict[tuple[int, str], float] = {}
    with attention_override(model, functools.partial(_dispatch, state), inner="sdpa"):  # sdpa whatever the model loaded with
        rerun = _Replay(model, input_ids)
        fast = replay and rerun.usable
        ref = torch.log_softmax(rerun.logits, dim=-1)
        for layer in range(n_layers) if layers is None else layers:
            for kind in ("k", "v"):
                state.update(layer=layer, kind=kind)
                logits = rerun.run(layer) if fast else model(input_ids=input_ids, use_cache=False).logits[0].float()
                lp = torch.log_softmax(logits, dim=-1)
                out[(layer, kind)] = max(0.0, float((ref.exp() * (ref - lp)).sum(-1).mean()))  # rounding can dip below 0
                if progress:
                    progress(layer, kind)
    return out
