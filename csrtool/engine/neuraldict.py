"""NeuralDict: learn a dictionary of unit atoms by gradient descent through sparse codes.

    train_dictionary(x [B, D], cfg, seed) -> (atoms [N, D], stats)

The dictionary is the weight [N, D] of one bias-free nn.Linear(D, N) (so
`linear(x)` are the atom correlations), initialised from k-means centroids of
the training vectors (or random training vectors) and renormalised to unit
atoms after every optimiser step. Per mini-batch:

1. support: idx [B, S] = pursuit.encode(x, atoms, S, encoder), no gradient;
2. coefficients, differentiable in the atoms given that support:
   omp -- least squares on the support, c = (A Aᵀ)⁻¹ A x with A = atoms[idx] [B, S, D];
   mp  -- the MP recursion c_s = <r_{s-1}, a_s>, r_s = r_{s-1} - c_s a_s;
3. loss = MSE(x, Σ c_s a_s) + β · L_div, with
   L_div = ‖I_N − A Aᵀ‖²_F / N² over the atoms' Gram [N, N] (pairwise coherence of
   atoms; the [D, D] frame Gram cannot approach I when N > D), and
   β = clamp(0.1 · MSE / L_div, 0, 1) on detached values.
   L_div is evaluated without forming the [N, N] Gram, by the exact identity
   ‖I − A Aᵀ‖²_F = N − 2‖A‖²_F + ‖Aᵀ A‖²_F (cost N·D² instead of N²·D).

Data parallel (`comm`, csrtool.engine.comm): every process passes its own disjoint
rows; the global batch of `batch_size` rows is split across processes in
proportion to their row counts, the loss is the global batch's, gradients, atom
usage and error sums are summed, and the root's k-means seeds and re-seeded atoms
are broadcast, so every process holds the same atoms after every step.

Adam with a cosine schedule; early stopping on a held-out split (the best
atoms by validation error are returned). After every epoch, unused atoms and
near-duplicates (|cos| > `dup_cos`) are re-seeded with the normalised residuals
of the worst-reconstructed training vectors, and their Adam state is reset.

Imports only torch (and the engine); allocates on x's device; never prints --
progress goes to an optional callback.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from csrtool.engine import pursuit
from csrtool.engine.comm import LOCAL, Comm, bcast, count
from csrtool.engine.kmeans import kmeans, unit_rows
from csrtool.errors import CsrError

SCOPES = ("head", "layer")
INITS = ("kmeans", "samples")
TRAIN_ERR_ROWS = 4096  # stats["train_rel_err"] is measured on at most this many training rows (all processes)
VAL_ERR_ROWS = 4096  # the held-out error (stats, early stopping) on at most this many held-out rows: on 9,830 rows and
                     # 16,384 training rows the two reported errors cost as much as the k-means itself (8,192 atoms)

# progress(epoch, epochs, val_rel_err) after every epoch
Progress = Callable[[int, int, float], None]


MAX_CROSS_DEPTH = 8  # the most layers below a cross-layer prediction may read (TrainConfig.cross_depth; dictionary files check it)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a trained dictionary set (recorded in the output file)."""

    atoms: int = 8192  # N atoms per dictionary, per layer: 13-bit indices; lower KL than 4,096 on every text and both models
                       # measured, at ~1.5x the training time (docs/quality.md, eleventh pass; §8 for 4,096)
    sparsity: int = 4  # S atoms per vector during training
    value_split: int = 1  # C chunks for values (keys always 1)
    scope: str = "layer"  # one dictionary per layer shared by its KV heads, or one per head
    encoder: str = "mp"  # support selection + coefficient rule in training: 'mp' | 'omp'
    epochs: int = 0  # NeuralDict epochs after k-means (0: k-means only, the best end to end so far, docs/quality.md §3, §8)
    batch_size: int = 256
    lr: float = 3e-3
    val_fraction: float = 0.1
    max_vectors: int = 16384  # training vectors per dictionary (random subsample above this)
    init: str = "kmeans"  # 'kmeans' centroids or 'samples' (random training vectors)
    kmeans_iters: int = 4
    patience: int = 2  # epochs without validation improvement before stopping
    dup_cos: float = 0.995  # atoms closer than this (|cos|) count as duplicates
    seed: int = 0
    center: bool = True  # subtract each dictionary's training mean before coding (stored with the atoms; the pipeline applies it)
    predictor: bool = False  # code what the token predictor leaves (csrtool.predictor; maps stored with the atoms)
    predictor_context: int = 1  # tokens each prediction reads: the token, and the ones before it
    predictor_depth: int = 0  # the predictor serves layers < this (0: every layer)
    cross_layer: bool = False  # predict each layer from the decoded layers below first (csrtool.crosslayer; maps stored with the atoms)
    cross_depth: int = 1  # with cross_layer: how many layers below each prediction reads (2 was no better: docs/quality.md, fourteenth pass)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise CsrError(msg)

        need(isinstance(self.atoms, int) and self.atoms >= 1, f"atoms must be a positive integer, got {self.atoms!r} (e.g. --atoms 1024)")
        need(isinstance(self.sparsity, int) and 1 <= self.sparsity <= self.atoms, f"sparsity must be between 1 and atoms ({self.atoms}), got {self.sparsity!r}")
        need(isinstance(self.value_split, int) and self.value_split >= 1, f"value_split must be a positive integer, got {self.value_split!r}")
        need(self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        need(self.encoder in pursuit.METHODS, f"encoder must be one of {', '.join(pursuit.METHODS)}, got {self.encoder!r}")
        need(self.init in INITS, f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        need(isinstance(self.epochs, int) and self.epochs >= 0, f"epochs must be a non-negative integer, got {self.epochs!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size!r}")
        need(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr!r}")
        need(isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        need(isinstance(self.max_vectors, int) and self.max_vectors >= 2, f"max_vectors must be an integer >= 2, got {self.max_vectors!r}")
        need(isinstance(self.kmeans_iters, int) and self.kmeans_iters >= 0, f"kmeans_iters must be a non-negative integer, got {self.kmeans_iters!r}")
        need(isinstance(self.patience, int) and self.patience >= 1, f"patience must be a positive integer, got {self.patience!r}")
        need(isinstance(self.dup_cos, (int, float)) and 0 < self.dup_cos <= 1, f"dup_cos must be in (0, 1], got {self.dup_cos!r}")
        need(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        need(isinstance(self.center, bool), f"center must be a boolean, got {self.center!r}")
        need(isinstance(self.predictor, bool), f"predictor must be a boolean, got {self.predictor!r}")
        need(isinstance(self.predictor_context, int) and not isinstance(self.predictor_context, bool) and 1 <= self.predictor_context <= 8,
             f"predictor_context must be 1 to 8 tokens, got {self.predictor_context!r}")
        need(isinstance(self.cross_layer, bool), f"cross_layer must be a boolean, got {self.cross_layer!r}")
        need(isinstance(self.cross_depth, int) and not isinstance(self.cross_depth, bool) and 1 <= self.cross_depth <= MAX_CROSS_DEPTH,
             f"cross_depth must be 1 to {MAX_CROSS_DEPTH} layers below, got {self.cross_depth!r}")
        need(isinstance(self.predictor_depth, int) and not isinstance(self.predictor_depth, bool) and self.predictor_depth >= 0,
             f"predictor_depth must be a non-negative number of layers (0: all), got {self.predictor_depth!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def training_bytes(cfg: TrainConfig, dim: int) -> int:
    """Rough peak memory (bytes) of train_dictionary for vectors of `dim` channels.

    Dominated by the atoms' pairwise coherence [N, N] (duplicate re-seeding, epochs > 0),
    the correlations of a chunk of vectors [8192, N] (k-means, pursuit) and about ten
    copies of the atoms [N, D] (weight, gradient, Adam moments, best, Gram form)."""
    n = cfg.atoms
    return 4 * ((n * n if cfg.epochs > 0 else 0) + 8192 * n + 10 * n * dim + 4 * cfg.max_vectors * dim)


def rel_err(x: torch.Tensor, x_hat: torch.Tensor, comm: Comm = LOCAL) -> float:
    """Σ‖x − x̂‖² / Σ‖x‖² over the set (over every process's rows with `comm`)."""
    den = comm.sum(x.double().pow(2).sum())
    return float(comm.sum((x.double() - x_hat.double()).pow(2).sum()) / den.clamp_min(1e-30))


def support_rows(atoms: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """atoms[idx] [B, S, D] for idx [B, S], with a reproducible gradient.

    The backward of advanced indexing (`atoms[idx]`, index_put_ with accumulate) is
    parallel and order-dependent on CPU with more than one thread: the same run gave
    different atoms each time (issue 14.7). index_select's backward is index_add_,
    which adds the rows in index order on CPU.
    """
    return atoms.index_select(0, idx.reshape(-1)).reshape(*idx.shape, atoms.shape[1])


def coefficients(x: torch.Tensor, atoms: torch.Tensor, idx: torch.Tensor, method: str, ridge: float = 1e-6) -> torch.Tensor:
    """Coefficients [B, S] for x [B, D] on the support idx [B, S], differentiable in atoms."""
    a = support_rows(atoms, idx)  # [B, S, D]
    if method == "omp":
        gram = a @ a.transpose(1, 2)  # [B, S, S]
        eye = torch.eye(idx.shape[1], dtype=gram.dtype, device=gram.device)
        rhs = (a @ x[:, :, None])  # [B, S, 1]
        return torch.linalg.solve(gram + ridge * eye, rhs)[:, :, 0]
    r, cs = x, []
    for s in range(idx.shape[1]):
        c = (r * a[:, s]).sum(1)  # [B]
        r = r - c[:, None] * a[:, s]
        cs.append(c)
    return torch.stack(cs, 1)


def diversity_loss(atoms: torch.Tensor) -> torch.Tensor:
    """L_div = ‖I_N − A Aᵀ‖²_F / N² for atoms A [N, D], via the [D, D] Gram (same value)."""
    n = atoms.shape[0]
    small = atoms.T @ atoms  # [D, D]
    return (n - 2 * atoms.pow(2).sum() + small.pow(2).sum()) / (n * n)


def diversity_beta(mse: torch.Tensor, l_div: torch.Tensor) -> torch.Tensor:
    """β = clamp(0.1 · MSE / L_div, 0, 1) on detached values."""
    return (0.1 * mse.detach() / l_div.detach().clamp_min(1e-30)).clamp(0.0, 1.0)


def reconstruct(x: torch.Tensor, atoms: torch.Tensor, sparsity: int, method: str) -> torch.Tensor:
    """x̂ [B, D] through pursuit codes (no gradient)."""
    with torch.no_grad():
        idx, coef = pursuit.encode(x, atoms, sparsity, method)
        return pursuit.decode(idx, coef, atoms)


def init_atoms(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, comm: Comm = LOCAL) -> torch.Tensor:
    """Initial unit atoms [N, D]: k-means centroids or random training vectors (the root's)."""
    if cfg.init == "kmeans":
        # fast: bf16 dot products assign the rows where the hardware has them (1.4-1.6x; docs/quality.md, eighteenth pass)
        return kmeans(x, cfg.atoms, cfg.kmeans_iters, gen, normalize=True, comm=comm, fast=True)
    if not comm.root:
        return bcast(comm, x.new_zeros(cfg.atoms, x.shape[1]))
    pick = torch.randint(x.shape[0], (cfg.atoms,), generator=gen, device=x.device) if cfg.atoms > x.shape[0] else torch.randperm(x.shape[0], generator=gen, device=x.device)[: cfg.atoms]
    return bcast(comm, unit_rows(x[pick]))


def _reseed(w: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, err: torch.Tensor, cfg: TrainConfig, opt: torch.optim.Optimizer,
            comm: Comm = LOCAL) -> None:
    """Replace atoms `rows` by normalised residuals of the worst-reconstructed rows of x (the root's)."""
    k = int(bcast(comm, torch.tensor(min(int(rows.numel()), x.shape[0]))))
    if k == 0:
        return
    rows = rows[:k]
    new = w.new_zeros(k, w.shape[1])
    if comm.root:
        worst = err.topk(k).indices
        xw = x[worst]
        resid = xw - reconstruct(xw, w.detach(), cfg.sparsity, cfg.encoder)
        small = resid.norm(dim=1) < 1e-6 * xw.norm(dim=1).clamp_min(1e-30)
        resid[small] = xw[small]  # perfectly coded rows: use the vector itself
        new = unit_rows(resid)
        err[worst] = 0  # do not pick the same rows again this epoch
    with torch.no_grad():
        w[rows] = bcast(comm, new)
    state = opt.state.get(w, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][rows] = 0


def split_sizes(n: int, cfg: TrainConfig, world: int = 1) -> tuple[int, int]:
    """(training rows, held-out rows) a dictionary takes from n vectors (one of `world` processes' share)."""
    n_val = int(round(cfg.val_fraction * n)) if cfg.val_fraction > 0 else 0
    n_val = min(n_val, n - 1)
    n_total = min(n, -(-cfg.max_vectors // world) + n_val)  # max_vectors is the budget of all processes
    return n_total - n_val, n_val


def _split(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    n_train, n_val = split_sizes(x.shape[0], cfg, world)
    perm = perm[: n_train + n_val]
    return x[perm[n_val:]], x[perm[:n_val]]


def _share(total: int, cap: int, mine: int) -> int:
    """Rows this process takes so that all processes together take about min(total, cap) of their `total`."""
    return math.ceil(min(total, cap) * mine / max(total, 1))


def train_dictionary(
    x: torch.Tensor,
    cfg: TrainConfig,
    seed: int | torch.Generator | None = None,
    progress: Optional[Progress] = None,
    val: torch.Tensor | None = None,
    comm: Comm = LOCAL,
) -> tuple[torch.Tensor, dict]:
    """Learn N unit atoms [N, D] for the rows of x [B, D]. Returns (atoms, stats).

    `seed` (int or torch.Generator on x's device) fixes the split, init and batches;
    default cfg.seed. `val` overrides the held-out split (then all of x trains).
    `comm`: data-parallel training over every process's rows of x (see the module doc).
    stats: train_rel_err (on at most TRAIN_ERR_ROWS rows), val_rel_err and init_val_rel_err (on at most VAL_ERR_ROWS
    held-out rows, always the same ones), epochs, best_epoch, reseeded.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise CsrError(f"need at least 2 training vectors of shape [B, D], got {list(x.shape)}")
    if isinstance(seed, torch.Generator):
        gen = seed
    else:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(cfg.seed if seed is None else int(seed))
    x = x.float()
    if val is None:
        x_tr, x_val = _split(x, cfg, gen, comm.world)
    else:
        x_tr, x_val = x[torch.randperm(x.shape[0], generator=gen, device=x.device)[: cfg.max_vectors]], val.float()
    n, s = cfg.atoms, cfg.sparsity

    lin = torch.nn.Linear(x.shape[1], n, bias=False, device=x.device, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(init_atoms(x_tr, cfg, gen, comm))
    w = lin.weight  # [N, D]
    opt = torch.optim.Adam([w], lr=cfg.lr)
    n_tr, n_val = count(comm, x_tr.shape[0]), count(comm, x_val.shape[0])  # over all processes
    steps_per_epoch = math.ceil(n_tr / cfg.batch_size)
    local_batch = math.ceil(cfg.batch_size * x_tr.shape[0] / n_tr)  # this process's part of each global batch
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))

    x_val = x_val[: _share(n_val, VAL_ERR_ROWS, x_val.shape[0])]

    def val_err(atoms: torch.Tensor) -> float:
        if n_val == 0:
            return float("nan")
        return rel_err(x_val, reconstruct(x_val, atoms, s, cfg.encoder), comm)

    best_atoms, best_val = w.detach().clone(), val_err(w.detach())
    init_val, best_epoch, stale, reseeded, ran = best_val, 0, 0, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        ran = epoch
        perm = torch.randperm(x_tr.shape[0], generator=gen, device=x.device)
        usage = torch.zeros(n, dtype=torch.long, device=x.device)
        err = torch.zeros(x_tr.shape[0], device=x.device)  # per-vector squared error, this epoch
        for step in range(steps_per_epoch):
            rows = perm[step * local_batch : (step + 1) * local_batch]
            xb = x_tr[rows]
            with torch.no_grad():
                idx, _ = pursuit.encode(xb, w.detach(), s, cfg.encoder) if rows.numel() else (rows.new_zeros(0, s), None)  # [b, S]
            coef = coefficients(xb, w, idx, cfg.encoder)
            x_hat = torch.einsum("bs,bsd->bd", coef, support_rows(w, idx))
            sq = (xb - x_hat).pow(2)
            mse = sq.sum() / (count(comm, rows.numel()) * x.shape[1])  # this process's share of the global batch's MSE
            l_div = diversity_loss(w)
            loss = mse + diversity_beta(comm.sum(mse.detach()), l_div) * l_div / comm.world
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if comm.world > 1:
                w.grad = comm.sum(w.grad)
            opt.step()
            sched.step()
            with torch.no_grad():
                w.copy_(unit_rows(w))
                usage += torch.bincount(idx.flatten(), minlength=n)
                err[rows] = sq.sum(1).detach()
        # re-seed dead and duplicate atoms
        with torch.no_grad():
            dead = comm.sum(usage) == 0
            cos = (w @ w.T).abs().triu(1)  # [N, N]
            dup = (cos > cfg.dup_cos).any(0)
            bad = (dead | dup).nonzero()[:, 0]
        if bad.numel():
            _reseed(w, bad, x_tr, err, cfg, opt, comm)
            reseeded += int(bad.numel())
        v = val_err(w.detach())
        if not v >= best_val - 1e-6 * abs(best_val):  # improved (always, without a val split: nan)
            best_atoms, best_val, best_epoch, stale = w.detach().clone(), v, epoch, 0
        else:
            stale += 1
        if progress is not None:
            progress(epoch, cfg.epochs, v)
        if stale >= cfg.patience:
            break
    # the training error on at most TRAIN_ERR_ROWS rows (x_tr is already a random order): on 65,536
    # vectors the full pass cost as much as a third of a NeuralDict epoch, for one reported number
    x_err = x_tr[: _share(n_tr, TRAIN_ERR_ROWS, x_tr.shape[0])]
    train = rel_err(x_err, reconstruct(x_err, best_atoms, s, cfg.encoder), comm)
    stats = {
        "train_rel_err": train,
        "val_rel_err": best_val,
        "init_val_rel_err": init_val,
        "epochs": ran,
        "best_epoch": best_epoch,
        "reseeded": reseeded,
        "train_vectors": n_tr,
        "val_vectors": n_val,
    }
    return best_atoms, stats
