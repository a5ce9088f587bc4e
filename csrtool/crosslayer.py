"""Cross-layer prediction: each layer's keys and values predicted from the decoded layer below, before coding.

A layer's K/V are projections of the residual stream, which every layer only adds to; so the
layer below's K/V of the same token (as the decoder has them: decoded) predict much of what the
token predictor leaves (docs/quality.md, thirteenth pass). The values of a layer are also
predicted from its own decoded keys (coded first). Closed loop, as in DPCM: the encoder predicts
from what the decoder will have, so coding errors never accumulate across layers.

    inputs(layer, kind, depth) -> [(layer', kind'), ...]   the decoded vectors a prediction reads: keys of layer l:
                                                    K, V of l - 1, ..., l - depth; values: those and K of l
    features(parts [B, H, T, D] each) -> [B, T, F]  heads and parts side by side (F = len(parts)·H·D)
    fit(f [T, F], y [T, H, D]) -> W [F + 1, H·D]    ridged least squares, the last row the bias
    predict(W, parts) -> [B, H, T, D]               float32
    Decoded()                                       the decoded code-space vectors of the coded tokens, by layer
        .put(layer, kind, first, x [B, H, T, D]); .get(layer, kind, first, t, partial=False) -> x | None; .clear()
    offset(xmap, decoded, layer, kind, first, t, like=None, depth=1) -> [B, H, t, D]   the prediction coding subtracts

Maps are fitted by csrtool.train (train-dict --cross-layer) on the calibration vectors, with the
inputs decoded at a reference sparsity, and stored in the dictionary file (`layer.{l}.{k|v}.xmap`).
Keys are predicted and read in the dictionaries' key space (pre-RoPE where they were trained so).
"""

from __future__ import annotations

import torch

from csrtool.errors import CsrError

RIDGE = 1e-3  # relative ridge: the inputs are decoded (noisy), so rare directions are damped more than the token predictor's


def inputs(layer: int, kind: str, depth: int = 1) -> list[tuple[int, str]]:
    """The (layer, kind) whose decoded vectors predict `kind` of `layer`, in feature order: K and V of each of the
    `depth` layers below (nearest first, those that exist), then for values the layer's own K."""
    below = [(b, side) for b in range(layer - 1, max(layer - depth, 0) - 1, -1) for side in ("k", "v")]
    return below + ([(layer, "k")] if kind == "v" else [])


def width(layer: int, kind: str, heads: int, dim: int, depth: int = 1) -> int:
    """F: the number of input features of a map for (layer, kind)."""
    return len(inputs(layer, kind, depth)) * heads * dim


def features(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, T, F] float32 from parts [B, H, T, D]: each token's heads and parts side by side."""
    return torch.cat([p.to(torch.float32).permute(0, 2, 1, 3).flatten(2) for p in parts], -1)


def fit(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """W [F + 1, H·D] float32 with y[t] ≈ [f[t], 1] · W (f [T, F], y [T, H, D]), lightly ridged (not the bias)."""
    t = f.shape[0]
    f1 = torch.cat([f.double(), torch.ones(t, 1, dtype=torch.float64)], 1)
    gram = f1.T @ f1
    ridge = RIDGE * gram.diagonal()[:-1].mean()
    gram[range(f.shape[1]), range(f.shape[1])] += ridge
    return torch.linalg.solve(gram, f1.T @ y.reshape(t, -1).double()).float()


def predict(w: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, H, T, D] float32: [features(parts), 1] · W, with H and D those of parts[0]."""
    b, h, t, d = parts[0].shape
    f = features(parts)
    w = w.to(f.device, torch.float32)
    if w.shape != (f.shape[-1] + 1, h * d):
        raise CsrError(f"a cross-layer map has shape {list(w.shape)}, its inputs need [{f.shape[-1] + 1}, {h * d}]: re-run csrtool train-dict")
    y = f @ w[:-1] + w[-1]
    return y.reshape(b, t, h, d).permute(0, 2, 1, 3)


class Decoded:
    """Decoded code-space vectors of the tokens coded last, per (layer, kind), with the position of their first token."""

    def __init__(self) -> None:
        self.spans: dict[tuple[int, str], tuple[int, torch.Tensor]] = {}

    def put(self, layer: int, kind: str, first: int, x: torch.Tensor) -> None:
        self.spans[(layer, kind)] = (first, x.detach().to(torch.float32))

    def get(self, layer: int, kind: str, first: int, t: int, partial: bool = False) -> torch.Tensor | None:
        """Positions [first, first + t) of (layer, kind), or None when they were not decoded last; `partial`: zeros
        for the positions not decoded last (None only when nothing of the layer was)."""
        got = self.spans.get((layer, kind))
        if got is None:
            return None
        f0, x = got
        if f0 <= first and first + t <= f0 + x.shape[2]:
            return x[:, :, first - f0 : first - f0 + t]
        if not partial:
            return None
        out = x.new_zeros(x.shape[0], x.shape[1], t, x.shape[3])
        lo, hi = max(first, f0), min(first + t, f0 + x.shape[2])
        if lo < hi:
            out[:, :, lo - first : hi - first] = x[:, :, lo - f0 : hi - f0]
        return out

    def clear(self) -> None:
        self.spans.clear()


def offset(xmap: torch.Tensor, decoded: Decoded, layer: int, kind: str, first: int, t: int,
           like: torch.Tensor | None = None, depth: int = 1) -> torch.Tensor:
    """[B, H, t, D]: the cross-layer prediction of `kind` at `layer` for positions [first, first + t). Every input must
    have been decoded at all of them (a file: CsrError otherwise), unless `like` ([B, H, *, D], the coded vectors) is
    given: inputs not decoded there then count as zeros (a simulated cache whose sliding-window layer below dropped
    those tokens before they were coded). `depth`: the layers below the map reads (DictSet.cross_depth)."""
    parts = []
    for src in inputs(layer, kind, depth):
        x = decoded.get(*src, first, t, partial=like is not None)
        if x is None and like is not None:
            x = torch.zeros(like.shape[0], like.shape[1], t, like.shape[3], device=like.device)
        if x is None:
            raise CsrError(f"layer {layer} {'keys' if kind == 'k' else 'values'} are predicted from the decoded "
                           f"{'keys' if src[1] == 'k' else 'values'} of layer {src[0]} at the same positions, which were not coded first "
                           "(cross-layer dictionaries code every layer of the same tokens in order)")
        parts.append(x)
    return predict(xmap, parts)
