"""What a compression method must provide to be evaluated, and the trivial methods.

A method turns the key or value vectors of tokens that leave the full-precision
window into their reconstruction, once per token:

    reconstruct(layer, kind, x [B, H, T, D], positions [T], ids [B, T] | None) -> x_hat [B, H, T, D]

and states its honest cost:

- `bits_k`, `bits_v`: payload bits per channel of a stored key / value, everything
  needed to decode it counted (indices, coefficients, scales, zero points);
- `side_bits`: bits stored once for the whole cache (dictionaries, codebooks),
  amortised over the context by the report.

A method that is a transformers cache instead (QuantizedCache) provides
`make_cache(model)` and no `reconstruct`; the runner then feeds the chunks through
that cache as a user would.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

FP16_BITS = 16


@runtime_checkable
class Method(Protocol):
    name: str
    bits_k: float
    bits_v: float
    side_bits: int

    def reconstruct(self, layer: int, kind: str, x: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor: ...


def bits_per_channel(method) -> float:
    """Mean payload bits per channel over keys and values (same channel counts)."""
    return (float(method.bits_k) + float(method.bits_v)) / 2.0


class Identity:
    """Keeps every vector exactly: the reference (the model's own cache dtype)."""

    def __init__(self, name: str = "reference", dtype: torch.dtype = torch.float32):
        self.name = name
        self.bits_k = self.bits_v = float(torch.finfo(dtype).bits)
        self.side_bits = 0

    def reconstruct(self, layer: int, kind: str, x: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return x


class CastMethod:
    """Stores old tokens in a narrower float type (fp16 by default)."""

    def __init__(self, dtype: torch.dtype = torch.float16, name: str = "fp16"):
        self.name = name
        self.dtype = dtype
        self.bits_k = self.bits_v = float(torch.finfo(dtype).bits)
        self.side_bits = 0

    def reconstruct(self, layer: int, kind: str, x: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return x.to(self.dtype).to(x.dtype)


class NoiseMethod:
    """Adds Gaussian noise of a given relative power: a deliberately degraded method for tests."""

    def __init__(self, rel_power: float = 0.1, seed: int = 0, name: str = "noise"):
        self.name = name
        self.rel_power = rel_power
        self.gen = torch.Generator().manual_seed(seed)
        self.bits_k = self.bits_v = 0.0
        self.side_bits = 0

    def reconstruct(self, layer: int, kind: str, x: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.gen, dtype=torch.float32).to(x.device, x.dtype)
        rms = x.float().pow(2).mean().sqrt()
        return x + noise * rms * self.rel_power**0.5
