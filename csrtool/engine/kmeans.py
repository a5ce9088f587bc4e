"""k-means for dictionary initialisation: k-means++ seeding, then a few Lloyd steps.

    kmeans(x [B, D], k, iters, generator, normalize, seed_rounds, fast) -> centroids [k, D]

Seeding is batched k-means++ (`kmeans_pp_batched`): `seed_rounds` rounds, each
drawing k / rounds new seeds at once by D² sampling without replacement and
updating every row's nearest-seed distance with one GEMM. The classic one-seed-
per-step loop (`kmeans_pp`, k sequential steps) is kept as the reference
(`seed_rounds=None`); after the Lloyd steps both give the same held-out error
(docs/quality.md, "Generalisation study").

With `normalize=True` (the default, what NeuralDict uses) rows of x are scaled to
unit norm first and the assignment is sign-invariant (a row joins the centroid
with the largest |cos|, flipped onto its sign): atoms are used with signed
coefficients, so x and -x want the same atom. With `normalize=False` it is plain
Euclidean k-means on the raw vectors.

`fast=True`: the assignment's dot products run in bfloat16 where the hardware has
native bf16 GEMMs (csrtool.engine.pursuit.fast_correlations; the match's sign from
an exact dot product): a near-tie between two centroids may go the other way.

Batched over rows (`chunk`), deterministic for a given torch.Generator, and
allocates on x's device. Imports only torch.
"""

from __future__ import annotations

import torch

from csrtool.engine.comm import LOCAL, Comm, bcast
from csrtool.engine.pursuit import argmax_rows, fast_correlations


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of x [B, D] scaled to unit norm (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator | None = None, signed: bool = False) -> torch.Tensor:
    """k-means++ seeding: indices [k] of rows of x [B, D] (k <= B), spread out by D² sampling.

    signed=True uses the sign-invariant distance min(|x-c|², |x+c|²) (for unit rows:
    2 - 2|cos|), matching the sign-invariant Lloyd step.
    """
    b = x.shape[0]
    assert 0 < k <= b, (k, b)
    sq = (x * x).sum(1)  # [B]
    first = torch.randint(b, (1,), generator=generator, device=x.device)
    picked = torch.empty(k, dtype=torch.long, device=x.device)
    picked[0] = first[0]

    def dist_to(i: torch.Tensor) -> torch.Tensor:
        dot = x @ x[i]  # [B]
        if signed:
            dot = dot.abs()
        return (sq - 2 * dot + sq[i]).clamp_min(0)

    best = dist_to(picked[0])  # [B] squared distance to the nearest seed so far
    for j in range(1, k):
        total = best.sum()
        if total <= 0:  # fewer distinct rows than k: fill with any rows not yet picked
            w = torch.ones_like(best)
            w[picked[:j]] = 0
            if w.sum() <= 0:
                w = torch.ones_like(best)
        else:
            w = best
        cdf = w.cumsum(0)  # D² sampling by inverse CDF (cheaper than multinomial per step)
        u = torch.rand(1, generator=generator, device=x.device, dtype=cdf.dtype) * cdf[-1]
        nxt = torch.searchsorted(cdf, u).clamp_max(b - 1)
        picked[j] = nxt[0]
        best = torch.minimum(best, dist_to(nxt[0]))
    return picked


def kmeans_pp_batched(x: torch.Tensor, k: int, rounds: int = 64, generator: torch.Generator | None = None,
                      signed: bool = False) -> torch.Tensor:
    """Batched k-means++ seeding: indices [k] of distinct rows of x [B, D] (k <= B).

    One uniform first seed, then `rounds` rounds of ceil((k - 1) / rounds) seeds each, drawn
    together by D² sampling without replacement (torch.multinomial); the nearest-seed
    distances [B] are updated after each round by one [B, m] GEMM. Rows that are already
    seeds have distance 0 and are never drawn again; when fewer than m rows have positive
    distance (duplicates), the rest are drawn uniformly from the rows not yet picked.
    """
    b = x.shape[0]
    assert 0 < k <= b and rounds >= 1, (k, b, rounds)
    sq = (x * x).sum(1)  # [B]
    picked = torch.randint(b, (1,), generator=generator, device=x.device)
    taken = torch.zeros(b, dtype=torch.bool, device=x.device)
    taken[picked] = True
    best = torch.full((b,), float("inf"), dtype=x.dtype, device=x.device)  # [B] distance to the nearest seed
    new = picked
    step = -(-(k - 1) // rounds)
    while True:
        dot = x @ x[new].T  # [B, m]
        if signed:
            dot.abs_()
        # min over the new seeds of |x - c|² = sq - max(2 x·c - |c|²), in place on [B, m]
        closest = dot.mul_(2).sub_(sq[new][None, :]).amax(1)  # [B]
        best = torch.minimum(best, (sq - closest).clamp_min(0))
        best[taken] = 0
        have = picked.numel()
        if have >= k:
            return picked[:k]
        m = min(step, k - have)
        w = best.clone()
        n_pos = int((w > 0).sum())
        if n_pos < m:  # too few rows left at positive distance: also draw from the untaken rest
            w = torch.where(taken, torch.zeros_like(w), w + (~taken).to(w.dtype) * (w.sum() / max(n_pos, 1) if n_pos else 1.0))
        new = torch.multinomial(w, m, replacement=False, generator=generator)
        taken[new] = True
        picked = torch.cat([picked, new])


def assign(x: torch.Tensor, c: torch.Tensor, signed: bool, chunk: int | None = None, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per row: (labels [B], sign [B] of the match, +1 if not signed). `fast`: bf16 dot products (module doc).

    Rows go in chunks whose [b, k] scores stay in cache (`chunk` None: about 2M entries;
    8,192 rows x 4,096 centroids took 3x as long per row on one core, bench/ndspeed.py), and
    the argmax is pursuit.argmax_rows (block maxima; torch's row argmax is a scalar loop).
    """
    labels, signs = [], []
    c_sq = (c * c).sum(1)  # [k]
    unit = bool(((c_sq - 1).abs() < 1e-4).all())
    if chunk is None:
        chunk = max(256, (1 << 21) // max(1, c.shape[0]))
    low = c.T.to(torch.bfloat16).contiguous() if fast and fast_correlations(x.dtype, x.device) else None  # [D, k]
    for s in range(0, x.shape[0], chunk):
        dot = x[s : s + chunk] @ c.T if low is None else (x[s : s + chunk].to(torch.bfloat16) @ low).float()  # [b, k]
        if unit:  # all |c| = 1: nearest is simply the largest (absolute) dot product
            score = dot.abs() if signed else dot
        elif signed:
            score = 2 * dot.abs() - c_sq  # maximise -|x ∓ c|² up to a per-row constant
        else:
            score = 2 * dot - c_sq
        lab = argmax_rows(score)
        labels.append(lab)
        if not signed:
            sg = torch.ones_like(lab, dtype=x.dtype)
        elif low is None:
            sg = dot.gather(1, lab[:, None])[:, 0].sign()
        else:
            sg = (x[s : s + chunk] * c[lab]).sum(1).sign()
        signs.append(torch.where(sg == 0, torch.ones_like(sg), sg))
    return torch.cat(labels), torch.cat(signs)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 5,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    comm: Comm = LOCAL,
    seed_rounds: int | None = 64,
    fast: bool = False,
) -> torch.Tensor:
    """Centroids [k, D] of x [B, D]: k-means++ seeds, then `iters` Lloyd steps.

    normalize=True: spherical, sign-invariant k-means on unit rows; centroids are
    returned with unit norm. seed_rounds: rounds of batched k-means++ seeding
    (None: the sequential one-seed-per-step loop). Empty clusters are re-seeded with the rows farthest
    from their centroid, so all k centroids stay distinct and useful.
    Data parallel (`comm`, csrtool.engine.comm): each process holds a slice of the
    rows; the root's seeds and re-seeds are broadcast, cluster sums and counts summed.
    fast: bf16 dot products in the Lloyd steps' assignment (module doc).
    """
    assert x.dim() == 2 and k >= 1
    xf = x.float()
    if normalize:
        xf = unit_rows(xf)
    b = xf.shape[0]
    if k > b:  # more atoms than rows: repeat rows (callers normally subsample atoms <= rows)
        reps = torch.randint(b, (k - b,), generator=generator, device=x.device)
        xf_pool = torch.cat([xf, xf[reps]])
    else:
        xf_pool = xf
    if comm.root:
        if seed_rounds is None:
            seeds = kmeans_pp(xf_pool, k, generator, signed=normalize)
        else:
            seeds = kmeans_pp_batched(xf_pool, k, seed_rounds, generator, signed=normalize)
        c = xf_pool[seeds].clone()
    else:
        c = xf.new_zeros(k, xf.shape[1])
    c = bcast(comm, c)  # [k, D]
    for _ in range(iters):
        labels, sign = assign(xf, c, signed=normalize, fast=fast)
        sums = comm.sum(torch.zeros_like(c).index_add_(0, labels, xf * sign[:, None]))  # [k, D]
        counts = comm.sum(torch.bincount(labels, minlength=k).to(xf.dtype))  # [k]
        empty = counts == 0
        new = sums / counts.clamp_min(1)[:, None]
        if empty.any():
            # farthest rows from their own centroid (the root's) take over the empty clusters
            fill = xf.new_zeros(int(empty.sum()), xf.shape[1])
            if comm.root:
                err = (xf - sign[:, None] * new[labels]).pow(2).sum(1)
                worst = err.topk(min(fill.shape[0], err.numel()), largest=True).indices
                fill = xf[worst[torch.arange(fill.shape[0], device=worst.device) % worst.numel()]]  # k > 2B: rows again, in turn
            new[empty] = bcast(comm, fill)
        c = new
        if normalize:
            c = unit_rows(c)
    return c.to(x.dtype)
