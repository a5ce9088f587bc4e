"""Paired block bootstrap over scored positions: how much of a Δppl is noise.

Neighbouring predictions of one text are correlated, so positions are resampled
in blocks of `block` consecutive positions (default 64), never across a document
boundary: each document is cut into its own blocks (the last one may be short)
and every resample draws, per document, as many blocks as it has, with
replacement. Pooling over documents is therefore stratified: each document
keeps its weight. The draw is paired: one set of resampled blocks per replicate
is applied to the reference and to every method, so a statistic compares the
methods on the same positions and shared difficulty cancels.

    Resampler(doc_lengths, block=64, reps=2000, seed=0)
    r.ppl_increase(nll_ref, nll_method) -> Interval      exp(Σ(m − r)/n) − 1
    r.mean(values)                     -> Interval       e.g. the KL per position
    r.ratio(nll_ref, nll_a, nll_b)     -> Interval       Δppl(a) / Δppl(b), same draws
    r.pooled_increase(nll_ref, runs)   -> Interval       Δppl over several trainings (runs drawn too)
    r.pooled_ratio(nll_ref, runs, nll_b) -> Interval     the same over Δppl(b)
    r.pooled_mean(runs)                -> Interval       a per-position mean (KL) over several trainings

Inputs are per-position float sequences concatenated over the documents in the
order of `doc_lengths`. Intervals are percentile intervals (default 95 %),
widened if need be to contain the point estimate. Same inputs and seed, same
interval: the draws come from a seeded torch generator on the CPU.

Verdicts against a bar (`verdict`): "met" when the whole interval is at or under
the limit, "not met" when it is all above, "not shown" when it straddles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csrtool.errors import CsrError

BLOCK = 64
REPS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    point: float
    lo: float
    hi: float

    def as_dict(self) -> dict:
        return {"point": self.point, "lo": self.lo, "hi": self.hi}


def blocks_of(doc_lengths: list[int], block: int = BLOCK) -> list[tuple[int, int, int]]:
    """(document, start, stop) of every block, in order; blocks never span two documents."""
    if block < 1:
        raise CsrError(f"bootstrap block must be >= 1 position, got {block}")
    out = []
    offset = 0
    for d, n in enumerate(doc_lengths):
        if n < 0:
            raise CsrError(f"document {d} has a negative length {n}")
        for s in range(0, n, block):
            out.append((d, offset + s, offset + min(n, s + block)))
        offset += n
    return out


class Resampler:
    """The replicate weights of one bootstrap: W [R, blocks], how often each block is drawn."""

    def __init__(self, doc_lengths: list[int], block: int = BLOCK, reps: int = REPS, seed: int = 0, level: float = LEVEL):
        if reps < 1:
            raise CsrError(f"bootstrap replicates must be >= 1, got {reps}")
        if not 0.0 < level < 1.0:
            raise CsrError(f"bootstrap level must lie in (0, 1), got {level}")
        self.doc_lengths = [int(n) for n in doc_lengths]
        self.n = sum(self.doc_lengths)
        self.blocks = blocks_of(self.doc_lengths, block)
        self.level = level
        gen = torch.Generator().manual_seed(seed)
        weights = torch.zeros(reps, len(self.blocks), dtype=torch.float64)
        first = 0
        for d in range(len(self.doc_lengths)):
            k = sum(1 for b in self.blocks if b[0] == d)
            if k:
                draws = torch.randint(0, k, (reps, k), generator=gen) + first
                weights.scatter_add_(1, draws, torch.ones(reps, k, dtype=torch.float64))
            first += k
        self.weights = weights  # [R, blocks]
        self.sizes = torch.tensor([b[2] - b[1] for b in self.blocks], dtype=torch.float64)  # [blocks]
        self.counts = weights @ self.sizes  # [R] positions per replicate

    def _sums(self, values) -> tuple[float, torch.Tensor]:
        """(total over all positions, [R] totals over each replicate's positions)."""
        x = torch.as_tensor(values, dtype=torch.float64).flatten()
        if x.numel() != self.n:
            raise CsrError(f"bootstrap got {x.numel()} per-position values for {self.n} positions")
        per_block = torch.stack([x[a:b].sum() for _, a, b in self.blocks]) if self.blocks else torch.zeros(0, dtype=torch.float64)
        return float(x.sum()), self.weights @ per_block

    def _interval(self, point: float, reps: torch.Tensor) -> Interval:
        reps = reps[torch.isfinite(reps)]
        if reps.numel() == 0 or not math.isfinite(point):
            return Interval(point, math.nan, math.nan)
        tail = (1.0 - self.level) / 2
        lo, hi = torch.quantile(reps, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
        return Interval(point, min(lo, point), max(hi, point))

    def mean(self, values) -> Interval:
        total, reps = self._sums(values)
        return self._interval(total / max(1, self.n), reps / self.counts.clamp_min(1))

    def ppl_increase(self, nll_ref, nll_method) -> Interval:
        point, reps = self._increase(nll_ref, nll_method)
        return self._interval(point, reps)

    def _increase(self, nll_ref, nll_method) -> tuple[float, torch.Tensor]:
        diff = torch.as_tensor(nll_method, dtype=torch.float64) - torch.as_tensor(nll_ref, dtype=torch.float64)
        total, reps = self._sums(diff)
        return math.expm1(total / max(1, self.n)), torch.expm1(reps / self.counts.clamp_min(1))

    def ratio(self, nll_ref, nll_a, nll_b) -> Interval:
        """Δppl(a) / Δppl(b) (e.g. a CSR row over KIVI-2), each replicate on the same positions."""
        pa, ra = self._increase(nll_ref, nll_a)
        pb, rb = self._increase(nll_ref, nll_b)
        point = pa / pb if pb != 0 else math.nan
        return self._interval(point, ra / rb)

    def _pooled(self, runs: list, seed: int, base=None) -> tuple[float, torch.Tensor]:
        """Mean per position of a quantity measured on several trainings (runs: per-position values of each, minus
        `base` if given), point and replicates: the mean over runs and positions; each replicate draws as many runs
        as there are, with replacement (seeded by `seed`), on its own blocks of positions."""
        if not runs:
            raise CsrError("pooling needs at least one run")
        shift = 0.0 if base is None else torch.as_tensor(base, dtype=torch.float64)
        sums = [self._sums(torch.as_tensor(r, dtype=torch.float64) - shift) for r in runs]
        totals = torch.tensor([t for t, _ in sums], dtype=torch.float64)
        reps = torch.stack([r for _, r in sums], 1)  # [R, runs]
        k = len(runs)
        draws = torch.randint(0, k, (reps.shape[0], k), generator=torch.Generator().manual_seed(seed))
        taken = torch.zeros_like(reps).scatter_add_(1, draws, torch.ones_like(reps))
        return float(totals.mean()) / max(1, self.n), (reps * taken).sum(1) / k / self.counts.clamp_min(1)

    def _pooled_rise(self, nll_ref, runs: list, seed: int) -> tuple[float, torch.Tensor]:
        """Δppl over several trainings, point and replicates: exp of the pooled mean log increase, minus 1."""
        point, reps = self._pooled(runs, seed, nll_ref)
        return math.expm1(point), torch.expm1(reps)

    def pooled_increase(self, nll_ref, runs: list, seed: int = 1) -> Interval:
        """ppl_increase of a method over several trainings (e.g. dictionary seeds): exp of the mean log increase over
        runs and positions, minus 1; the interval holds the training's noise as well as the positions' (one run:
        exactly ppl_increase)."""
        return self._interval(*self._pooled_rise(nll_ref, runs, seed))

    def pooled_mean(self, runs: list, seed: int = 1) -> Interval:
        """mean (e.g. the KL per position) over several trainings, runs drawn as in pooled_increase."""
        return self._interval(*self._pooled(runs, seed))

    def pooled_ratio(self, nll_ref, runs: list, nll_b, seed: int = 1) -> Interval:
        """pooled_increase over Δppl(b) of a method trained once (KIVI-2), each replicate on the same positions."""
        pa, ra = self._pooled_rise(nll_ref, runs, seed)
        pb, rb = self._increase(nll_ref, nll_b)
        return self._interval(pa / pb if pb != 0 else math.nan, ra / rb)


def verdict(interval: Interval | dict, limit: float) -> str:
    """'met' (interval at or under limit), 'not met' (all above) or 'not shown' (straddles or unknown)."""
    lo, hi = (interval.lo, interval.hi) if isinstance(interval, Interval) else (interval["lo"], interval["hi"])
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "not shown"
    if hi <= limit:
        return "met"
    if lo > limit:
        return "not met"
    return "not shown"
