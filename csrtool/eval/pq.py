"""Product quantisation (faiss) at the same bits per vector as a CSR setting.

A D-channel vector is cut into M = bits·D/8 sub-vectors; each is replaced by the
index (8 bits) of its nearest centroid in a codebook of 256 trained by k-means on
calibration activations. One set of codebooks per layer and kind, shared by the
KV heads (as our per-layer dictionaries are).

Honest cost: exactly `bits` per channel of payload; the codebooks (256·D values
per layer and kind, counted at fp16) are side bits, amortised by the report.
"""

from __future__ import annotations

import numpy as np
import torch

from csrtool.errors import CsrError

CODE_BITS = 8
CODEBOOK_BITS = 16  # centroids counted at fp16


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def subquantizers(bits: float, head_dim: int) -> int:
    """M such that M·8 bits = bits·D; raise CsrError when no such M splits D evenly."""
    m = bits * head_dim / CODE_BITS
    if m != int(m) or int(m) < 1 or head_dim % int(m):
        raise CsrError(
            f"product quantisation cannot spend {bits} bits/channel on head_dim {head_dim}: "
            f"bits·D/8 must be a whole number of sub-vectors dividing D (try --bits 1 or 2)"
        )
    return int(m)


class ProductQuantizer:
    """PQ with codebooks per (layer, kind) trained on `calib[(layer, kind)]` = [n, D]."""

    def __init__(self, calib: dict[tuple[int, str], torch.Tensor], bits: float, seed: int = 1234, name: str | None = None):
        import faiss

        if not calib:
            raise CsrError("product quantisation needs calibration activations (none were collected)")
        self.head_dim = next(iter(calib.values())).shape[-1]
        self.m = subquantizers(bits, self.head_dim)
        self.name = name or f"pq{bits:g}"
        self.bits_k = self.bits_v = float(bits)
        self.quantizers = {}
        need = 2**CODE_BITS
        have = min(x.reshape(-1, self.head_dim).shape[0] for x in calib.values())
        if have < need:
            raise CsrError(f"product quantisation needs at least {need} calibration vectors per layer, got {have}: raise --calib-tokens")
        for key, x in sorted(calib.items()):
            pq = faiss.ProductQuantizer(self.head_dim, self.m, CODE_BITS)
            pq.cp.seed = seed
            pq.cp.min_points_per_centroid = 1  # few calibration vectors: train anyway, quietly
            pq.train(np.ascontiguousarray(x.reshape(-1, self.head_dim).float().cpu().numpy()))
            self.quantizers[key] = pq
        self.side_bits = len(self.quantizers) * (2**CODE_BITS) * self.head_dim * CODEBOOK_BITS

    def reconstruct(self, layer: int, kind: str, x: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        pq = self.quantizers.get((layer, kind))
        if pq is None:
            raise CsrError(f"no PQ codebook for layer {layer} {kind}: calibration did not cover it")
        flat = np.ascontiguousarray(x.reshape(-1, x.shape[-1]).float().cpu().numpy())
        out = pq.decode(pq.compute_codes(flat))
        return torch.from_numpy(out).reshape(x.shape).to(x.device, x.dtype)
