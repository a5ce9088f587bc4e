"""Chunked teacher-forced passes through a cache whose old tokens are compressed.

The text (token ids [1, T]) is fed in chunks of C tokens through a transformers
DynamicCache. After each chunk, every token older than the last W tokens that is
not compressed yet is replaced, in the cache, by the method's reconstruction:
each token is compressed exactly once, when it leaves the window, and stays
compressed. The first `sink` tokens of the sequence (attention sinks) are never
compressed. So a prediction in chunk c attends to the sink tokens, compressed
history, the W window tokens and its own chunk in full precision.

Measured per pass:
- end to end, on the predictions after the first chunk (those that can see
  compressed history): negative log-likelihood, KL(reference ‖ method) and top-1
  agreement against the reference pass (same chunks, nothing compressed);
- reconstruction per layer, K/V and head on the vectors actually compressed;
- attention fidelity per layer: with the pass's real queries, each attention
  call is run a second time with the compressed tokens swapped back for their
  originals; Σ‖o − o_exact‖² / Σ‖o_exact‖² over all calls that saw compressed tokens.
  This isolates the layer's own cache error (its inputs are those of the pass).

The attention call is observed through csrtool.attention_hook.attention_override
for the duration of a pass.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from csrtool.attention_hook import attention_override, supported
from csrtool.errors import CsrError
from csrtool.eval import metrics, sliding
from csrtool.eval.methods import Identity
from csrtool.models import last_logits

Progress = Callable[[str], None]


# ------------------------------------------------------------------ attention probe


def _probe(feed: "CompressedFeed", inner: Callable, module, query, key, value, attention_mask, **kwargs):
    out, weights = inner(module, query, key, value, attention_mask, **kwargs)
    layer = getattr(module, "layer_idx", None)
    exact = feed.exact.get(layer)
    if exact is not None and exact[0].shape[2] > 0:
        n = exact[0].shape[2]
        k_exact = torch.cat([exact[0], key[:, :, n:]], dim=2)
        v_exact = torch.cat([exact[1], value[:, :, n:]], dim=2)
        ref, _ = inner(module, query, k_exact, v_exact, attention_mask, **kwargs)
        feed.attn.setdefault(layer, metrics.RatioStats()).add(out, ref)
    return out, weights


@contextmanager
def observing(model, feed: "CompressedFeed") -> Iterator[None]:
    """Observe the model's attention calls for `feed` (no-op for flash/flex kernels: fidelity not measured)."""
    if not (feed.track_attention and supported(model)):
        yield
        return
    with attention_override(model, functools.partial(_probe, feed)):
        yield


# ------------------------------------------------------------------ the compressed cache


class CompressedFeed:
    """Feed token chunks through a cache, compressing tokens that leave the window."""

    def __init__(self, model, method, window: int, track: bool = False, sink: int = 0):
        from transformers import DynamicCache

        self.model = model
        self.method = method
        self.window = window
        self.sink = sink  # positions [0, sink) stay in full precision
        self.pos = 0  # tokens fed so far
        self.ids = torch.empty(1, 0, dtype=torch.long)  # their ids (the token predictor's input)
        self.done = 0  # tokens handled so far (positions [0, done): sink tokens kept, the rest compressed)
        self.recon: dict[tuple[int, str], metrics.ErrorStats] = {}
        self.exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # originals of compressed tokens
        self.attn: dict[int, metrics.RatioStats] = {}
        self.reconstructs = hasattr(method, "reconstruct")
        if hasattr(method, "reset"):  # a new sequence: cross-layer dictionaries forget the layers they decoded
            method.reset()
        self.track_attention = track and self.reconstructs
        self.track = track
        if hasattr(method, "make_cache"):
            self.cache = method.make_cache(model)
        else:
            self.cache = DynamicCache(config=model.config)
            sliding.check_layers(model, self.cache)

    def step(self, ids: torch.Tensor, age: bool = True, last: bool = False) -> torch.Tensor:
        """Forward ids [1, n]; return logits [n, V] (float32; last=True: the last position's only, [1, V],
        where the model can skip the others' vocabulary head); then age the cache."""
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **(last_logits(self.model) if last else {}))
        self.pos += ids.shape[1]
        self.ids = torch.cat([self.ids, ids.to("cpu", torch.long)], 1)
        if age:
            self.age()
        return out.logits[0].float()

    def age(self) -> None:
        """Replace tokens older than the last `window` (and not yet compressed) by reconstructions."""
        upto = self.pos - self.window
        a = max(self.done, self.sink)
        if not self.reconstructs or upto <= a:
            return
        b = upto
        for layer_idx, layer in enumerate(self.cache.layers):
            # a sliding-window layer holds only its last tokens: compress those of [a, b) it still holds
            first = sliding.first_held(layer, self.pos)
            lo = max(a, first)
            if lo >= b:
                continue
            positions = torch.arange(lo, b, device=self.model.device)
            pair = []
            for kind, store in (("k", layer.keys), ("v", layer.values)):
                x = store[:, :, lo - first : b - first].clone()
                x_hat = self.method.reconstruct(layer_idx, kind, x, positions, self.ids[:, :b]).to(store.dtype)
                if x_hat.shape != x.shape:
                    raise CsrError(f"method {self.method.name} returned shape {list(x_hat.shape)} for {list(x.shape)}")
                store[:, :, lo - first : b - first] = x_hat
                if self.track:
                    self.recon.setdefault((layer_idx, kind), metrics.ErrorStats()).add(x, x_hat)
                pair.append(x)
            if self.track_attention and first == 0:  # attention fidelity: full-attention layers only
                old = self.exact.get(layer_idx)
                if old is None and a > 0:  # the sink tokens, kept as they are: exact[l] covers positions [0, b)
                    old = (layer.keys[:, :, :a].clone(), layer.values[:, :, :a].clone())
                self.exact[layer_idx] = (
                    (pair[0], pair[1]) if old is None else (torch.cat([old[0], pair[0]], 2), torch.cat([old[1], pair[1]], 2))
                )
        self.done = b


# ------------------------------------------------------------------ passes


@dataclass
class Reference:
    """The uncompressed pass: log-probabilities of the scored predictions."""

    logprobs: torch.Tensor  # [P, V] float32, predictions at positions chunk .. T-2
    targets: torch.Tensor  # [P]
    nll: float
    seconds: float
    nll_pos: torch.Tensor | None = None  # [P] float64, −log p(target) per scored prediction

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(1, self.targets.numel()))


@dataclass
class PassResult:
    name: str
    nll: float
    kl: float  # mean over scored predictions
    top1: float
    n_scored: int
    recon: dict[tuple[int, str], metrics.ErrorStats] = field(default_factory=dict)
    attn: dict[int, metrics.RatioStats] = field(default_factory=dict)
    seconds: float = 0.0
    nll_pos: torch.Tensor | None = None  # [P] float64 per scored prediction, as Reference.nll_pos
    kl_pos: torch.Tensor | None = None  # [P] float64 KL(reference ‖ method) per scored prediction

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(1, self.n_scored))


def check_inputs(ids: torch.Tensor, chunk: int, window: int, sink: int = 0) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise CsrError(f"token ids must be [1, T], got {list(ids.shape)}")
    if chunk < 1:
        raise CsrError(f"--chunk must be >= 1, got {chunk}")
    if window < 0:
        raise CsrError(f"--window must be >= 0, got {window}")
    if sink < 0:
        raise CsrError(f"--sink must be >= 0, got {sink}")
    if ids.shape[1] < chunk + 2:
        raise CsrError(f"need more than one chunk of text: {ids.shape[1]} tokens for --chunk {chunk}; use more --tokens or a longer --text")


def _scored(logits: torch.Tensor, start: int, t: int, chunk: int) -> slice:
    """Rows of a chunk's logits [n, V] (positions start..start+n-1) that are scored: chunk <= p <= t-2."""
    lo = max(start, chunk) - start
    hi = min(start + logits.shape[0], t - 1) - start
    return slice(lo, max(lo, hi))


@torch.no_grad()
def reference_pass(model, ids: torch.Tensor, chunk: int, progress: Progress | None = None) -> Reference:
    """Feed ids [1, T] in chunks with nothing compressed; keep the scored log-probabilities."""
    check_inputs(ids, chunk, 0)
    t0 = time.perf_counter()
    t = ids.shape[1]
    feed = CompressedFeed(model, Identity(), window=t)
    rows, nlls = [], []
    targets = ids[0, chunk + 1 :]
    row = 0
    for start in range(0, t, chunk):
        logits = feed.step(ids[:, start : start + chunk])
        sc = logits[_scored(logits, start, t, chunk)]
        nlls.append(metrics.nll_per_position(sc, targets[row : row + sc.shape[0]]).cpu())  # same float64 math as method_pass
        row += sc.shape[0]
        rows.append(torch.log_softmax(sc, dim=-1))
        if progress:
            progress(f"reference: {min(t, start + chunk)}/{t} tokens")
    logprobs = torch.cat(rows)
    nll_pos = torch.cat(nlls)
    return Reference(logprobs, targets, float(nll_pos.sum()), time.perf_counter() - t0, nll_pos)


@torch.no_grad()
def method_pass(
    model, ids: torch.Tensor, method, ref: Reference, chunk: int, window: int, progress: Progress | None = None, sink: int = 0
) -> PassResult:
    """Feed ids [1, T] in chunks through the method's compressed cache; compare to `ref`."""
    check_inputs(ids, chunk, window, sink)
    t0 = time.perf_counter()
    t = ids.shape[1]
    feed = CompressedFeed(model, method, window=window, track=True, sink=sink)
    agree = 0.0
    row = 0
    nlls, kls = [], []
    with observing(model, feed):
        for start in range(0, t, chunk):
            logits = feed.step(ids[:, start : start + chunk])
            sc = logits[_scored(logits, start, t, chunk)]
            n = sc.shape[0]
            if n:
                ref_rows = ref.logprobs[row : row + n]
                nlls.append(metrics.nll_per_position(sc, ref.targets[row : row + n]).cpu())
                kls.append(metrics.kl_per_position(ref_rows, sc).cpu())
                agree += float((ref_rows.argmax(-1) == sc.argmax(-1)).double().sum())
                row += n
            if progress:
                progress(f"{method.name}: {min(t, start + chunk)}/{t} tokens")
    assert row == ref.targets.numel(), (row, ref.targets.numel())
    nll_pos, kl_pos = torch.cat(nlls), torch.cat(kls)
    return PassResult(
        method.name, float(nll_pos.sum()), float(kl_pos.sum()) / max(1, row), agree / max(1, row), row,
        feed.recon, feed.attn, time.perf_counter() - t0, nll_pos, kl_pos,
    )


@torch.no_grad()
def collect_kv(model, ids: torch.Tensor, chunk: int = 512) -> dict[tuple[int, str], torch.Tensor]:
    """Keys and values as the cache holds them (post-RoPE) for ids [1, T]: {(layer, kind): [H*T, D]}."""
    feed = CompressedFeed(model, Identity(), window=ids.shape[1])
    for start in range(0, ids.shape[1], chunk):
        feed.step(ids[:, start : start + chunk])
    out = {}
    for layer_idx, layer in enumerate(feed.cache.layers):
        for kind, x in (("k", layer.keys), ("v", layer.values)):
            out[(layer_idx, kind)] = x[0].reshape(-1, x.shape[-1]).float().cpu()
    return out
