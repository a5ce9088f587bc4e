"""Per-vector adaptive sparsity: each vector gets as many atoms as its fit needs, same mean.

    count_bits(s_max) -> bits of one vector's atom count (values 0..s_max)
    slots(m, s, atom_bits, s_max) -> atoms that M vectors may use in all, so that with their counts they
                                     cost no more than S fixed atoms each
    choose_counts(gains [M, S_max], total, cost) -> counts [M] in 0..S_max, Σ cost[count] <= total (cost: atoms,
                                             or bits per count, e.g. set-coded indices, engine/setcode.py)
    truncate(gamma [M, S], chol [M, S, S] | None, counts [M]) -> coef [M, S], zero past each count
    used_slots(counts [M], S) -> bool [M, S], True for each vector's first counts[t] slots

A greedy pursuit removes energy one atom at a time: with unit atoms, MP's k-th step
lowers ‖r‖² by c_k², OMP's by γ_k² (its k-th coefficient over the orthonormalised
support, see pursuit.py). So the error of every prefix code is known from one run at
S_max atoms: err_t(k) = ‖x_t‖² − Σ_{j≤k} gain_t[j]. The counts minimise
Σ_t err_t(k_t) + λ·Σ_t k_t, with λ found by bisection so the mean count fits the
budget: a vector that codes well stops early and one that fits badly (text of
another domain, an outlier token) gets more atoms. Because OMP is greedy, the first
k atoms of the S_max support are the k-atom OMP code; its least-squares
coefficients are the back substitution L⁻ᵀγ with γ zeroed past k (L lower
triangular, so the coefficients past k come out exactly zero).

Imports only torch; runs on the inputs' device.
"""

from __future__ import annotations

import torch

_BISECTIONS = 50


def count_bits(s_max: int) -> int:
    """Bits that hold a count in 0..s_max."""
    return max(1, int(s_max).bit_length())


def slots(m: int, sparsity: int, atom_bits: int, s_max: int) -> int:
    """Atoms M vectors may use in all: the largest K with K·atom_bits + M·count_bits <= M·S·atom_bits
    (integers, so the writer and a reader of a file agree on it exactly)."""
    return max(0, m * (sparsity * atom_bits - count_bits(s_max)) // atom_bits)


def choose_counts(gains: torch.Tensor, total: int, cost: torch.Tensor | None = None) -> torch.Tensor:
    """Counts [M] (int64, 0..S) minimising Σ err + λ·Σ cost[count] with Σ cost[count] <= total.

    gains [M, S]: energy removed by each pursuit step (>= 0). cost [S + 1] (non-decreasing, cost[0] = 0):
    what a count costs, default the count itself (total is then atoms). Ties go to fewer atoms.
    """
    m, s = gains.shape
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=gains.device)
    # value[t, k] = energy removed by the first k atoms, k = 0..S
    value = torch.cat([gains.new_zeros(m, 1), gains.double().cumsum(1)], 1)  # [M, S+1]
    steps = torch.arange(s + 1, dtype=torch.float64, device=gains.device) if cost is None else cost.to(gains.device, torch.float64)

    def counts_at(lam: float) -> torch.Tensor:
        return (steps * lam - value).argmin(1)  # argmin returns the first (fewest atoms) on ties

    def spent(k: torch.Tensor) -> int:
        return int(k.sum()) if cost is None else int(steps[k].sum())

    if (m * s <= total) if cost is None else spent(counts_at(0.0)) <= total:  # everything fits
        return counts_at(0.0)
    lo, hi = 0.0, float(value[:, -1].max()) + 1.0  # at hi every count is 0
    best = counts_at(hi)
    for _ in range(_BISECTIONS):
        lam = (lo + hi) / 2
        k = counts_at(lam)
        if spent(k) > total:
            lo = lam
        else:
            hi, best = lam, k
    return best


def used_slots(counts: torch.Tensor, s: int) -> torch.Tensor:
    """bool [M, S]: slot j of vector t holds an atom (j < counts[t])."""
    return torch.arange(s, device=counts.device)[None, :] < counts.reshape(-1, 1)


def truncate(gamma: torch.Tensor, chol: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    """Coefficients [M, S] of each vector's first counts[t] atoms, zeros after.

    MP (chol None): gamma are the coefficients themselves. OMP: gamma [M, S] and the
    support's Cholesky factor L [M, S, S] (lower); the prefix solution is L⁻ᵀ·γ with γ
    zeroed past the count."""
    keep = used_slots(counts, gamma.shape[1])
    g = torch.where(keep, gamma, 0.0)  # where, not a product: unused slots are +0, never -0
    if chol is None:
        return g
    coef = torch.linalg.solve_triangular(chol.transpose(1, 2), g[:, :, None], upper=True)[:, :, 0]
    return torch.where(keep, coef, 0.0)
