"""KIVI-style asymmetric quantisation (Liu et al. 2024), our implementation of the published scheme.

- keys: per channel, over groups of `group` consecutive tokens;
- values: per token, over groups of `group` consecutive channels;
- each group stores its minimum and its scale in fp16 (32 bits per group) and
  every element a `bits`-bit integer q = round((x − min) / scale), scale = (max − min) / (2^bits − 1).

Honest cost: bits + 32 / group bits per channel (KIVI-2 with groups of 32 = 3 bits).
The full-precision window of recent tokens is the runner's, shared by every method.
A partial group (fewer tokens or channels than `group`) is quantised on its own.
"""

from __future__ import annotations

import torch

from csrtool.errors import CsrError

GROUP_PARAM_BITS = 32  # fp16 minimum + fp16 scale


def quantize_groups(x: torch.Tensor, bits: int, dim: int, group: int) -> torch.Tensor:
    """Min/scale quantise x along `dim` in groups of `group`; return the dequantised tensor."""
    levels = 2**bits - 1
    xt = x.float().movedim(dim, -1)  # [..., n]
    n = xt.shape[-1]
    pad = (-n) % group
    if pad:  # pad by repeating the last element: leaves min and max of the group unchanged
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], dim=-1)
    g = xt.reshape(*xt.shape[:-1], -1, group)  # [..., n/group, group]
    mn = g.amin(-1, keepdim=True)
    scale = (g.amax(-1, keepdim=True) - mn) / levels
    mn, scale = mn.half().float(), scale.half().float()  # stored in fp16
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((g - mn) / safe), 0, levels)
    out = (q * scale + mn).reshape(*xt.shape)[..., :n]
    return out.movedim(-1, dim).to(x.dtype)


class KIVI:
    """KIVI-b: keys per channel over token groups, values per token over channel groups."""

    def __init__(self, bits: int, group: int = 32, name: str | None = None):
        if bits not in (1, 2, 3, 4, 8):
            raise CsrError(f"KIVI bits {bits} not supported: use 1, 2, 3, 4 or 8")
        if group < 1:
            raise CsrError(f"KIVI group size {group} must be positive")
        self.bits = bits
        self.group = group
        self.name = name or f"kivi{bits}"
        self.bits_k = self.bits_v = bits + GROUP_PARAM_BITS / group
        self.side_bits = 0

    def reconstruct(self, layer: int, kind: str, x: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, H, T, D]: keys group along T (dim 2), values along D (dim 3)
        dim = 2 if kind == "k" else 3
        return quantize_groups(x, self.bits, dim=dim, group=self.group)
