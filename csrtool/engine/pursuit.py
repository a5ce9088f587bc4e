"""Sparse coding: batched Matching Pursuit and Orthogonal Matching Pursuit.

    encode(x [B, D], atoms [N, D], S, method) -> (idx [B, S] int64, coef [B, S] float32)
    decode(idx [B, S], coef [B, S], atoms [N, D]) -> [B, D]
    encode_split(x [B, C*Dc], atoms [C, N, Dc], S) -> (idx [B, C, S], coef [B, C, S])
    encode_groups(x [G, B, D], atoms [G, N, D], S) -> (idx [G, B, S], coef [G, B, S])

Atoms are unit-norm rows. Everything runs in the "Gram form" (batch-OMP,
Rubinstein/Zibulevsky/Elad 2008): the correlations a = X·Dᵀ [B, N] come from
one GEMM per chunk, after which a step touches only rows of G = D·Dᵀ [N, N].

- MP:  pick i = argmax |a|, c = a[i], a ← a − c·G[i].
- OMP: the support's Gram submatrix G_II = L·Lᵀ is Cholesky-factored one row per
  step. With u_k = D·q_k the correlations of the k-th orthonormalised atom q_k
  (Gram-Schmidt of the support), everything is incremental:
      L[k, :k] = u_{:k}[i_k]                (the new Cholesky row is a gather)
      L[k, k]  = sqrt(G[i_k, i_k] − |L[k, :k]|²)
      γ_k      = a[i_k] / L[k, k]           (= forward substitution L·γ = a0[I])
      u_k      = (G[i_k] − Σ_j L[k, j]·u_j) / L[k, k]
      a       ← a − γ_k·u_k                 (= a0 − G[:, I]·coef, the OMP residual)
  and the least-squares coefficients are coef = L⁻ᵀ·γ (one back substitution).
  Chosen atoms are masked, so OMP never picks one twice; an atom (numerically)
  in the span of the support gets coefficient 0 (this is what happens for S > D).

When the batch is small next to N (B·(S−1) < N) building G costs more than it
saves; then the rows G[i] and u_k are computed from the atoms by GEMM instead
("direct form", same algorithm and same results up to rounding).

Ties in argmax go to the lowest atom index. Half-precision inputs are computed
in float32; float64 inputs stay float64. Vectors are processed in chunks, so
memory is bounded by the chunk size, not by B.

Fast correlations (`fast=True`: train-dict, and compress, eval and the live cache through
codec.FAST). On float32 work where the hardware has native bfloat16 GEMMs (x86 CPUs with
avx512_bf16 or AMX, CUDA GPUs with bf16; `fast_correlations`) the direct form is used (unless a
Gram is passed) and each step correlates the exact float32 residual r afresh, D·r as one bfloat16
GEMM (a0 = X·Dᵀ likewise in the Gram form), so the rounding is relative to r, not to x, and steers
only which atom is picked. Every coefficient comes from exact float32 dot products (OMP:
γ_k = (x·d_i − L[k, :k]·γ_{:k}) / L[k, k], the forward substitution itself; MP:
c = x·d_i − Σ_j c_j·d_j·d_i): the codes carry the least-squares (OMP) or matching-pursuit
coefficients of the atoms chosen. In the direct form bf16 only screens: of the two atoms with the
largest bf16 |correlation| (`_refine`), the one with the larger exact float32 correlation with r is
picked, so a pick differs from the exact path's only where a third atom comes within bf16 rounding
of the best (the codes of real rows: the exact path's on 98-99% of vectors; the bf16 argmax alone,
`refine=False`, which train-dict's settle uses: 61-81%). The bf16 rounding of r and of the atoms is
elementwise, so a vector's atoms do not depend on the batch it is coded in any more than the exact
path's do (bench/fast_correlations.py: identical codes for 100% of vectors coded all at once and
three at a time; docs/quality.md, nineteenth pass). Without native bf16, and for float64,
`fast=True` is the exact path bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from csrtool.engine import adaptive

METHODS = ("mp", "omp")
_CHUNK_ELEMS = 1 << 18  # default chunk: about this many [vector, atom] entries (a [B, N] slab that fits in L2)
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags of a native bf16 dot product


def fast_correlations(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `fast=True` work of `dtype` on `device` picks atoms from bf16 correlation GEMMs (see the module doc)."""
    if dtype != torch.float32:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _native_bf16_cpu()


@functools.cache
def _native_bf16_cpu() -> bool:
    """x86 CPUs whose flags (Linux /proc/cpuinfo) include a native bf16 dot product; elsewhere, False:
    an emulated bf16 GEMM is slower than float32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return any(f in line.split() for f in _NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def gram(atoms: torch.Tensor) -> torch.Tensor:
    """G = D·Dᵀ: [N, D] -> [N, N], or per group [G, N, D] -> [G, N, N]; fp32 for half inputs."""
    a = atoms.to(_compute_dtype(atoms.dtype))
    return a @ a.transpose(-1, -2)


def encode(
    x: torch.Tensor,
    atoms: torch.Tensor,
    sparsity: int,
    method: str = "omp",
    chunk: int | None = None,
    gram: torch.Tensor | bool | None = None,
    fast: bool = False,
    refine: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code each row of x [B, D] with `sparsity` atoms of `atoms` [N, D] (unit rows).

    Returns idx [B, S] int64 and coef [B, S] float32 on x's device. `chunk` bounds
    how many vectors are coded at once (None: sized so a chunk's [B, N] work fits
    in cache). `gram`: a precomputed D·Dᵀ [N, N] (from `gram(atoms)`), True/False
    to force the Gram/direct form, or None to choose by cost. `fast`: fast
    correlations where the hardware has them (module doc); `refine` False: the bf16 argmax picks alone
    (train-dict's settle), not the better of two by exact correlations.
    """
    if gram is not None and not isinstance(gram, bool):
        gram = gram[None]
    idx, coef = encode_groups(x[None], atoms[None], sparsity, method, chunk, gram, fast, refine)
    return idx[0], coef[0]


def decode(idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Reconstruct [B, D] vectors from codes: sum_s coef[:, s] * atoms[idx[:, s]]."""
    return decode_groups(idx[None], coef[None], atoms[None])[0]


def encode_split(
    x: torch.Tensor,
    atoms: torch.Tensor,
    sparsity: int,
    method: str = "omp",
    chunk: int | None = None,
    gram: torch.Tensor | bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel split: x [B, C*Dc] with atoms [C, N, Dc] -> idx, coef [B, C, S].

    Channel chunk c (columns c*Dc:(c+1)*Dc) is coded with atoms[c].
    """
    c, _, dc = atoms.shape
    if x.shape[-1] != c * dc:
        raise ValueError(f"x has {x.shape[-1]} channels but atoms [C={c}, N, Dc={dc}] cover {c * dc}")
    xg = x.reshape(x.shape[0], c, dc).transpose(0, 1)  # [C, B, Dc]
    idx, coef = encode_groups(xg, atoms, sparsity, method, chunk, gram)
    return idx.transpose(0, 1).contiguous(), coef.transpose(0, 1).contiguous()


def decode_split(idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_split: idx, coef [B, C, S], atoms [C, N, Dc] -> [B, C*Dc]."""
    out = decode_groups(idx.transpose(0, 1), coef.transpose(0, 1), atoms)  # [C, B, Dc]
    return out.transpose(0, 1).reshape(idx.shape[0], -1)


def decode_groups(idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """idx, coef [G, B, S] with atoms [G, N, D] -> [G, B, D] (group g decoded with atoms[g])."""
    g, n, d = atoms.shape
    b, s = idx.shape[1], idx.shape[2]
    cd = _compute_dtype(atoms.dtype)
    flat_idx = (idx + torch.arange(g, device=idx.device).mul_(n)[:, None, None]).reshape(g * b, s)
    out = F.embedding_bag(
        flat_idx, atoms.reshape(g * n, d).to(cd), per_sample_weights=coef.reshape(g * b, s).to(cd), mode="sum"
    )  # [G*B, D]
    return out.view(g, b, d).to(atoms.dtype)


def encode_groups(
    x: torch.Tensor,
    atoms: torch.Tensor,
    sparsity: int,
    method: str = "omp",
    chunk: int | None = None,
    gram: torch.Tensor | bool | None = None,
    fast: bool = False,
    refine: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Code group g of x [G, B, D] with atoms[g] of [G, N, D]: idx, coef [G, B, S].

    All groups go through one bmm per chunk (e.g. one dictionary per KV head).
    `gram`, `fast` and `refine` as in `encode`, with a precomputed Gram of shape [G, N, N].
    """
    idx, coef, _ = _encode_all(x, atoms, sparsity, method, chunk, gram, keep_chol=False, fast=fast, refine=refine)
    g, b = x.shape[0], x.shape[1]
    return idx.view(g, b, idx.shape[1]), coef.float().view(g, b, idx.shape[1])


def encode_groups_adaptive(
    x: torch.Tensor,
    atoms: torch.Tensor,
    max_sparsity: int,
    total: int,
    method: str = "omp",
    chunk: int | None = None,
    relative: bool = False,
    cost: torch.Tensor | None = None,
    fast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adaptive sparsity (engine/adaptive.py): each vector of x [G, B, D] gets 0..max_sparsity atoms,
    at most `total` over all G·B vectors (with `cost` [S_max + 1]: Σ cost[count] <= total, e.g. bits),
    minimising the summed squared error (relative: the summed error of each vector relative to its own
    energy). Returns idx, coef [G, B, S_max] (coefficients zero and indices 0 past a vector's count)
    and counts [G, B]. `fast` as in `encode`."""
    idx, gamma, chol = _encode_all(x, atoms, max_sparsity, method, chunk, None, keep_chol=True, fast=fast)
    gains = gamma.pow(2)
    if relative:
        gains = gains / x.reshape(-1, x.shape[-1]).to(gains.dtype).pow(2).sum(1, keepdim=True).clamp_min(torch.finfo(gains.dtype).tiny)
    counts = adaptive.choose_counts(gains, total, cost)
    idx = idx * adaptive.used_slots(counts, max_sparsity)
    coef = adaptive.truncate(gamma, chol, counts)
    g, b = x.shape[0], x.shape[1]
    return idx.view(g, b, max_sparsity), coef.float().view(g, b, max_sparsity), counts.view(g, b)


def _encode_all(
    x: torch.Tensor, atoms: torch.Tensor, sparsity: int, method: str, chunk: int | None, gram: torch.Tensor | bool | None,
    keep_chol: bool, fast: bool = False, refine: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """idx [G*B, S] and, rows group-major (group g's vectors are rows g*B .. g*B+B-1):
    keep_chol False: the coefficients [G*B, S] and None;
    keep_chol True: gamma [G*B, S] and, for OMP, the supports' Cholesky factors [G*B, S, S] (coef = L⁻ᵀγ)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x.dim() != 3 or atoms.dim() != 3 or x.shape[0] != atoms.shape[0] or x.shape[2] != atoms.shape[2]:
        raise ValueError(f"need x [G, B, D] and atoms [G, N, D], got {tuple(x.shape)} and {tuple(atoms.shape)}")
    s = int(sparsity)
    g, b, d = x.shape
    n = atoms.shape[1]
    if s < 1 or (method == "omp" and s > n):
        raise ValueError(f"sparsity must be in 1..N={n} for {method}, got {sparsity}")
    dev = x.device
    cd = _compute_dtype(torch.promote_types(x.dtype, atoms.dtype))
    idx = torch.empty(g, b, s, dtype=torch.long, device=dev)
    gamma = torch.empty(g, b, s, dtype=cd, device=dev)
    chol = torch.empty(g, b, s, s, dtype=cd, device=dev) if method == "omp" and keep_chol else None
    if b == 0:
        return idx.view(0, s), gamma.view(0, s), None if chol is None else chol.view(0, s, s)  # G*B = 0 rows
    with torch.no_grad():
        atoms_c = atoms.to(device=dev, dtype=cd).contiguous()
        low = atoms_c.transpose(1, 2).to(torch.bfloat16).contiguous() if fast and fast_correlations(cd, dev) else None  # [G, D, N]
        if gram is None:  # the Gram pays off when B·(S−1) ≥ N, unless the direct form's GEMMs are fast ones
            gram = low is None and b * g * max(s - 1, 1) >= n * g
        if gram is True:
            gram = atoms_c @ atoms_c.transpose(1, 2)  # [G, N, N]
        elif gram is not False:
            gram = gram.to(device=dev, dtype=cd)
        if chunk is None:
            chunk = max(256, _CHUNK_ELEMS // n)
        per = max(1, chunk // g)  # vectors per group per chunk
        scratch = _Scratch()  # one set of work buffers for every chunk: fresh ones would be paged in again each time
        for start in range(0, b, per):
            stop = min(b, start + per)
            xb = x[:, start:stop].to(cd)
            i, gm, l = _pursuit(xb, atoms_c, gram if gram is not False else None, s, method, scratch, low, refine)
            idx[:, start:stop] = i.view(g, stop - start, s)
            if l is not None and not keep_chol:  # OMP's least-squares coefficients, chunk by chunk
                gm = torch.linalg.solve_triangular(l.transpose(1, 2), gm[:, :, None], upper=True)[:, :, 0]
            gamma[:, start:stop] = gm.view(g, stop - start, s)
            if chol is not None:
                chol[:, start:stop] = l.view(g, stop - start, s, s)
    return idx.view(g * b, s), gamma.view(g * b, s), None if chol is None else chol.view(g * b, s, s)


class _Scratch:
    """Work buffers reused across the chunks of one encode: `take(name, shape, dtype, device)` is a view of
    buffer `name`, reallocated only when a larger one is needed (its contents are whatever was left)."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self.bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _argmax_abs(a: torch.Tensor, buf: torch.Tensor | None = None, chosen: torch.Tensor | None = None) -> torch.Tensor:
    """argmax_j |a[:, j]| per row, lowest index on ties: [M, N] -> [M]; `chosen` [M, k] columns excluded.

    torch's argmax over a row is a scalar loop, ~10x slower than amax; so take the
    amax of blocks of W columns (vectorised), argmax over the N/W block maxima, then
    argmax inside the winning block. The first block holding the maximum, then the
    first lane in it, is the lowest index holding it: same answer as argmax.
    """
    return argmax_rows(_abs_scores(a, buf, chosen))


def _abs_scores(a: torch.Tensor, buf: torch.Tensor | None, chosen: torch.Tensor | None) -> torch.Tensor:
    """|a| [M, N] (into `buf` if given) with the `chosen` [M, k] columns at −1, below every candidate."""
    score = torch.abs(a, out=buf) if buf is not None else a.abs()
    if chosen is not None:
        score.scatter_(1, chosen, -1.0)
    return score


def _refine(
    a: torch.Tensor, buf: torch.Tensor | None, chosen: torch.Tensor | None, residual: torch.Tensor, atoms_flat: torch.Tensor,
    base: torch.Tensor,
) -> torch.Tensor:
    """The fast path's pick, in place of _argmax_abs(a, buf, chosen): of the two atoms with the largest bf16
    |correlation| a [M, N], the one whose exact float32 correlation with the residual [M, D] is larger ([M] atom indices).

    So bf16 only screens: the pick is the exact argmax unless a third atom comes within the bf16 rounding
    of the best. The runner-up is the second lane of the winning block or the best lane of the second
    block (argmax_rows' blocks): three candidates, two [M, W] gathers, not another pass over the [M, N] scores."""
    score = _abs_scores(a, buf, chosen)
    m, n = score.shape
    w = _block(n)
    rows = torch.arange(m, device=score.device)
    if not w:
        cand = score.topk(min(2, n), dim=1).indices  # [M, 2]
        cand_score = score.gather(1, cand)
    else:
        blocks = score.view(m, n // w, w)
        top = blocks.amax(dim=2).topk(2, dim=1).indices  # [M, 2] the two best blocks
        first = blocks[rows, top[:, 0]].topk(2, dim=1)  # the winning block's two best lanes
        second = blocks[rows, top[:, 1]].max(dim=1)  # the second block's best lane
        cand = torch.stack([top[:, 0] * w + first.indices[:, 0], top[:, 0] * w + first.indices[:, 1], top[:, 1] * w + second.indices], 1)
        cand_score = torch.stack([first.values[:, 0], first.values[:, 1], second.values], 1)
    atoms = atoms_flat.index_select(0, (base[:, None] + cand).reshape(-1)).view(m, cand.shape[1], -1)  # [M, c, D]
    exact = torch.bmm(atoms, residual[:, :, None])[:, :, 0].abs()
    exact = torch.where(cand_score < 0, -1.0, exact)  # a chosen atom (score −1) never wins
    return cand.gather(1, exact.argmax(dim=1, keepdim=True))[:, 0]


def _block(n: int) -> int:
    """argmax_rows' block width for N columns (0: too few columns for blocks)."""
    return next((w for w in (64, 32) if n % w == 0 and n >= 4 * w), 0)


def argmax_rows(score: torch.Tensor) -> torch.Tensor:
    """score.argmax(dim=1) for [M, N] (lowest index on ties), by block maxima: see _argmax_abs."""
    m, n = score.shape
    w = _block(n)
    if not w:
        return score.argmax(dim=1)
    blocks = score.view(m, n // w, w)
    best = blocks.amax(dim=2).argmax(dim=1)  # [M] winning block
    lane = blocks[torch.arange(m, device=score.device), best].argmax(dim=1)  # [M]
    return best * w + lane


def _pursuit(
    x: torch.Tensor, atoms: torch.Tensor, gram: torch.Tensor | None, s: int, method: str, scratch: _Scratch | None = None,
    low: torch.Tensor | None = None, refine: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk: x [G, B, D], atoms [G, N, D], gram [G, N, N] or None -> idx [G*B, S], gamma [G*B, S]
    and L [G*B, S, S] (OMP; coef = L⁻ᵀγ) or None (MP; gamma are the coefficients). The results are views
    of `scratch`'s buffers when one is given: copy them out before the next chunk. `low` [G, D, N]: the atoms
    in bf16 for fast correlations (module doc), or None."""
    g, b, d = x.shape
    n = atoms.shape[1]
    m = g * b  # rows of the flat layout
    dev, dt = x.device, x.dtype
    atoms_t = atoms.transpose(1, 2)  # [G, D, N]
    atoms_flat = atoms.view(g * n, d)  # [G*N, D]
    x_flat = x.reshape(m, d)
    base = torch.arange(g, device=dev).mul_(n).repeat_interleave(b)  # [M] row offset of each vector's group
    scratch = scratch or _Scratch()

    def buf(name: str, *shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return scratch.take(name, shape, dtype, dev)

    def correlate(v: torch.Tensor, name: str) -> torch.Tensor:  # v [G, B, D] -> v·Dᵀ [M, N] (bf16 with `low`)
        if low is None:
            return torch.bmm(v, atoms_t, out=buf(name, g, b, n)).view(m, n)
        return torch.bmm(v.to(torch.bfloat16), low, out=buf(name, g, b, n, dtype=torch.bfloat16)).view(m, n)

    if low is None:
        a = correlate(x, "a")  # [M, N] correlations
    else:
        a = buf("a", m, n).copy_(correlate(x, "a_low"))  # float32 from here: the updates below are exact
    score = buf("score", m, n)  # |a| scratch
    rows = buf("rows", m, n) if gram is not None else None  # G[i] scratch

    def gram_rows(i: torch.Tensor) -> torch.Tensor:  # [M] -> G[i] [M, N]
        if gram is not None:
            return torch.index_select(gram.view(g * n, n), 0, base + i, out=rows)
        return torch.bmm(atoms_flat.index_select(0, base + i).view(g, b, d), atoms_t).view(m, n)

    def exact_dot(i: torch.Tensor, atom: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x·d_i in float32 [M], and d_i [M, D] (gathered unless given)."""
        atom = atoms_flat.index_select(0, base + i) if atom is None else atom
        return (x_flat * atom).sum(1), atom

    idx = scratch.take("idx", (m, s), torch.long, dev)
    residual = buf("residual", m, d).copy_(x_flat) if low is not None and gram is None else None  # fast direct form
    picks = residual is not None and refine  # bf16 screens two atoms, exact correlations with the residual pick (_refine)
    if method == "mp":
        coef = buf("coef", m, s)
        for k in range(s):
            i = _refine(a, score, None, residual, atoms_flat, base) if picks else _argmax_abs(a, score)
            if low is None:
                c = a.gather(1, i[:, None])  # [M, 1]
            else:  # c = (x − Σ_j c_j d_j)·d_i from exact dot products
                c, atom = exact_dot(i)
                if k:
                    chosen = atoms_flat.index_select(0, (base[:, None] + idx[:, :k]).reshape(-1)).view(m, k, d)
                    c = c - (coef[:, :k] * torch.bmm(chosen, atom[:, :, None]).view(m, k)).sum(1)  # Σ_j c_j d_j·d_i
                c = c[:, None]
            idx[:, k], coef[:, k] = i, c[:, 0]
            if k + 1 < s:
                if residual is None:
                    a.addcmul_(gram_rows(i), c, value=-1)
                else:  # direct form, fast: correlate the exact residual afresh (errors relative to it, not to x)
                    residual.addcmul_(atom, c, value=-1)
                    a.copy_(correlate(residual.view(g, b, d), "a_low"))
        return idx, coef, None

    diag = gram.diagonal(dim1=1, dim2=2).reshape(-1) if gram is not None else atoms_flat.pow(2).sum(1)  # [G*N]
    tol = 100 * torch.finfo(dt).eps
    chol = buf("chol", m, s, s).zero_()  # L, lower triangular
    gamma = buf("gamma", m, s).zero_()  # L·γ = a0[support]
    basis = buf("basis", m, max(s - 1, 1), n if gram is not None else d)  # u_k or q_k
    for k in range(s):
        chosen = idx[:, :k] if k else None
        i = _refine(a, score, chosen, residual, atoms_flat, base) if picks else _argmax_abs(a, score, chosen)  # [M]
        idx[:, k] = i
        di = diag[base + i]  # [M]
        atom = None
        if k == 0:
            l, d2 = None, di
        elif gram is not None:
            l = basis[:, :k].gather(2, i.view(m, 1, 1).expand(m, k, 1)).view(m, k)  # u_j[i] = L[k, j]
            d2 = di - (l * l).sum(1)
        else:
            atom = atoms_flat.index_select(0, base + i)  # [M, D]
            l = torch.bmm(basis[:, :k], atom[:, :, None]).view(m, k)  # q_j·d_i = L[k, j]
            d2 = di - (l * l).sum(1)
        ok = d2 > tol * di  # False: atom in the span of the support, give it coefficient 0
        lkk = torch.where(ok, d2.clamp_min(tol).sqrt(), torch.ones_like(d2))
        if low is None:
            ai = a.gather(1, i[:, None])[:, 0]  # the residual's correlation with d_i
        else:  # the same from exact dot products: a0[i] − L[k, :k]·γ (forward substitution)
            ai, atom = exact_dot(i, atom)  # the direct form gathered d_i above
            if l is not None:
                ai = ai - (l * gamma[:, :k]).sum(1)
        gk = torch.where(ok, ai / lkk, torch.zeros_like(d2))
        chol[:, k, k], gamma[:, k] = lkk, gk
        if l is not None:
            chol[:, k, :k] = l * ok[:, None]
        if k + 1 == s:
            break
        scale = (ok / lkk)[:, None]
        if gram is not None:
            u = basis[:, k]  # [M, N] view; u_k is written in place
            if l is None:
                torch.mul(gram_rows(i), scale, out=u)
            else:
                # in place on the gathered rows: baddbmm with out= falls back to a loop of addmm, and the
                # out-of-place form first copies its input into a fresh [M, N] tensor (a fifth of the time at S = 4)
                t = gram_rows(i)
                t.view(m, 1, n).baddbmm_(l.view(m, 1, k), basis[:, :k], alpha=-1)
                torch.mul(t, scale, out=u)
        else:
            q = atoms_flat.index_select(0, base + i) if atom is None else atom
            if l is not None:
                q = torch.baddbmm(q.view(m, 1, d), l.view(m, 1, k), basis[:, :k], alpha=-1).view(m, d)
            basis[:, k] = q * scale
            if residual is not None:  # fast: correlate the exact residual x − Σ γ_j q_j afresh (errors relative to it)
                residual.addcmul_(basis[:, k], gk[:, None], value=-1)
                a.copy_(correlate(residual.view(g, b, d), "a_low"))
                continue
            u = torch.bmm(basis[:, k].view(g, b, d), atoms_t).view(m, n)
        a.addcmul_(u, gk[:, None], value=-1)
    return idx, gamma, chol
