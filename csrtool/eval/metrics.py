"""Quality metrics: reconstruction error, distribution distance, perplexity.

Pure tensor math on any device. Shapes: vectors are [..., D] (last dim = channels);
logits are [T, V] (one row per predicted position).

- relative squared error  ‖x − x̂‖² / ‖x‖²   summed over all vectors (energy-weighted)
- cosine similarity       mean over vectors of <x, x̂> / (‖x‖ ‖x̂‖)
- SQNR                    10·log10(‖x‖² / ‖x − x̂‖²) dB   (= −10·log10(rel. error))
- KL(p_ref ‖ p)           mean over positions, in nats
- top-1 agreement         fraction of positions where both argmaxes agree
- perplexity              exp(mean negative log-likelihood of the targets)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

EPS = 1e-30


def rel_sq_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """‖x − x̂‖² / ‖x‖² over all elements (0 for a perfect copy)."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x**2).sum() + EPS))


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean cosine similarity of the vectors along the last dim."""
    x, x_hat = x.double(), x_hat.double()
    num = (x * x_hat).sum(-1)
    den = x.norm(dim=-1) * x_hat.norm(dim=-1)
    return float((num / den.clamp_min(EPS)).mean())


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB (inf for a perfect copy)."""
    return db_from_rel(rel_sq_error(x, x_hat))


def db_from_rel(rel: float) -> float:
    return math.inf if rel <= 0 else -10.0 * math.log10(rel)


def kl_per_position(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) ‖ softmax(logits)) per row [T], nats."""
    lp_ref = torch.log_softmax(ref_logits.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0.0)


def kl_div(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(p_ref ‖ p) over positions."""
    return float(kl_per_position(ref_logits, logits).mean())


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions whose argmax tokens agree."""
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).double().mean())


def nll_per_position(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log p(target) per row [T] (float64): logits [T, V], targets [T]."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return -lp.gather(-1, targets.long()[:, None])[:, 0]


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of −log p(target) over rows: logits [T, V], targets [T]."""
    return float(nll_per_position(logits, targets).sum())


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL) of targets [T] under logits [T, V]."""
    return math.exp(nll_sum(logits, targets) / max(1, targets.numel()))


@dataclass
class ErrorStats:
    """Running reconstruction statistics for one (layer, kind), per head.

    add() takes x, x_hat [B, H, T, D]; sums are kept per head in float64 so that
    the aggregate relative error is exactly Σ‖x − x̂‖² / Σ‖x‖² over every vector seen.
    """

    err: list[float] = field(default_factory=list)  # per head Σ‖x − x̂‖²
    energy: list[float] = field(default_factory=list)  # per head Σ‖x‖²
    cos_sum: list[float] = field(default_factory=list)  # per head Σ cos
    count: list[int] = field(default_factory=list)  # per head number of vectors

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        heads = x.shape[1]
        if not self.err:
            self.err, self.energy, self.cos_sum, self.count = [0.0] * heads, [0.0] * heads, [0.0] * heads, [0] * heads
        diff = ((x - x_hat) ** 2).sum(-1)  # [B, H, T]
        energy = (x**2).sum(-1)
        cos = (x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1)).clamp_min(EPS)
        for h in range(heads):
            self.err[h] += float(diff[:, h].sum())
            self.energy[h] += float(energy[:, h].sum())
            self.cos_sum[h] += float(cos[:, h].sum())
            self.count[h] += int(diff[:, h].numel())

    @property
    def rel_err(self) -> float | None:
        return sum(self.err) / (sum(self.energy) + EPS) if self.count else None

    @property
    def cos(self) -> float | None:
        return sum(self.cos_sum) / max(1, sum(self.count)) if self.count else None

    @property
    def sqnr_db(self) -> float | None:
        rel = self.rel_err
        return None if rel is None else db_from_rel(rel)

    def merge(self, other: "ErrorStats") -> None:
        """Add another run's sums (e.g. the next document) to these."""
        if not self.err:
            self.err, self.energy, self.cos_sum, self.count = list(other.err), list(other.energy), list(other.cos_sum), list(other.count)
            return
        for mine, theirs in ((self.err, other.err), (self.energy, other.energy), (self.cos_sum, other.cos_sum), (self.count, other.count)):
            for h, v in enumerate(theirs):
                mine[h] += v

    def per_head(self) -> list[dict]:
        return [
            {
                "rel_err": e / (n + EPS),
                "cos": c / max(1, k),
                "sqnr_db": db_from_rel(e / (n + EPS)),
            }
            for e, n, c, k in zip(self.err, self.energy, self.cos_sum, self.count)
        ]


@dataclass
class RatioStats:
    """Running Σ‖a − b‖² / Σ‖b‖² (e.g. attention output error per layer)."""

    err: float = 0.0
    energy: float = 0.0
    count: int = 0

    def add(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        out, ref = out.double(), ref.double()
        self.err += float(((out - ref) ** 2).sum())
        self.energy += float((ref**2).sum())
        self.count += 1

    def merge(self, other: "RatioStats") -> None:
        self.err += other.err
        self.energy += other.energy
        self.count += other.count

    @property
    def value(self) -> float | None:
        return self.err / (self.energy + EPS) if self.count else None
