"""Sparse coding: batched Matching Pursuit and Orthogonal Matching Pursuit.

PLACEHOLDER: a simple, correct version of the final API. The fast Gram-form
implementation (incremental Cholesky OMP) replaces the bodies, not the API.

    encode(x [B, D], atoms [N, D], sparsity S, method) -> (idx [B, S] int64, coef [B, S])
    decode(idx [B, S], coef [B, S], atoms [N, D]) -> [B, D]
"""

from __future__ import annotations

import torch

METHODS = ("mp", "omp")


def encode(
    x: torch.Tensor, atoms: torch.Tensor, sparsity: int, method: str = "omp", chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code each row of x [B, D] with `sparsity` atoms of `atoms` [N, D] (unit rows)."""
    assert method in METHODS, method
    out_i, out_c = [], []
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk].float()
        a = atoms.float()
        r = xb.clone()
        idx = torch.zeros(xb.shape[0], sparsity, dtype=torch.long, device=x.device)
        coef = torch.zeros(xb.shape[0], sparsity, dtype=torch.float32, device=x.device)
        for s in range(sparsity):
            corr = r @ a.T  # [B, N]
            i = corr.abs().argmax(dim=1)
            idx[:, s] = i
            if method == "mp":
                c = corr.gather(1, i[:, None])[:, 0]
                coef[:, s] = c
                r = r - c[:, None] * a[i]
            else:
                sub = a[idx[:, : s + 1]]  # [B, s+1, D]
                sol = torch.linalg.lstsq(sub.transpose(1, 2), xb[:, :, None]).solution[:, :, 0]
                coef[:, : s + 1] = sol
                r = xb - (sol[:, :, None] * sub).sum(1)
        out_i.append(idx)
        out_c.append(coef)
    return torch.cat(out_i), torch.cat(out_c)


def decode(idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Reconstruct [B, D] vectors from codes: sum_s coef[:, s] * atoms[idx[:, s]]."""
    return torch.einsum("bs,bsd->bd", coef.to(atoms.dtype), atoms[idx])
