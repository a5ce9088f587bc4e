"""Rotary position embedding (RoPE): rotate keys to and from their positions.

transformers stores keys after RoPE; coding them before RoPE is easier: the
rotation depends on the position, so one dictionary of pre-RoPE keys serves them all.
RoPE is a rotation per channel pair, so it is exactly invertible:

    post = pre * cos + rotate_half(pre) * sin       (rotate)
    pre  = post * cos - rotate_half(post) * sin     (unrotate)

with cos/sin from `inv_freq` [D/2] (any static rope type: default, linear,
llama3, yarn) times the token positions, times `scaling` (yarn's attention factor).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] for positions [T] (fp32 math, as transformers does)."""
    freqs = positions.float()[:, None] * inv_freq.float().to(positions.device)[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Apply RoPE to x [..., T, D] at positions [T]."""
    cos, sin = cos_sin(inv_freq, positions, scaling)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def unrotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Undo RoPE on x [..., T, D] at positions [T] (exact inverse of `rotate`)."""
    cos, sin = cos_sin(inv_freq, positions, 1.0)
    xf = x.float() / scaling
    return (xf * cos - rotate_half(xf) * sin).to(x.dtype)
