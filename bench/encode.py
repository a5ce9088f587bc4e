"""Encoding speed and error: our batched MP/OMP vs scikit-learn's OMP vs the GEMM bound.

    .venv/bin/python bench/encode.py --quick --json bench/encode.json [--acts ACTS_DIR]

For each head width D (64, and 128 = two heads side by side), dictionary size N
and sparsity S, rows report vectors/s and the relative error sum‖x − x̂‖² / sum‖x‖²:

- gemm-bound: the X·Dᵀ GEMM every Gram-form pursuit starts with (the faster of one
  GEMM over all vectors and the same GEMM in the engine's chunks);
- mp, omp: csrtool.engine.pursuit.encode with the dictionary's Gram precomputed
  (as an encoder would cache it per dictionary; its one-off cost is `gram_s`);
- sklearn-omp: sklearn.linear_model.orthogonal_mp_gram on a subset of the same
  vectors (Gram and Xy = D·x precomputed for it too, outside the timing).

Data: SmolLM2 keys from `--acts` (csrtool collect output) when given, else
synthetic correlated Gaussian vectors. Dictionary: N random unit-normalised
training vectors (k-means++-like seeding without the reweighting), disjoint
from the coded vectors.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from csrtool.engine import pursuit


def synthetic(t: int, d: int, seed: int) -> torch.Tensor:
    """[T, D] Gaussian vectors with a decaying spectrum and a random rotation (roughly like keys)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.7)
    mean = torch.randn(d, generator=gen) * 0.3
    return (torch.randn(t, d, generator=gen) * scale) @ q.T + mean


def real(acts: Path, t: int, d: int) -> tuple[torch.Tensor, str]:
    from csrtool.formats.acts import ActsReader

    reader = ActsReader(acts)
    layer = reader.layers[len(reader.layers) // 2]
    k = reader.load(layer, "k", max_tokens=t)  # [T, H, Dh]
    heads = d // k.shape[2]
    x = k[:, :heads].reshape(k.shape[0], heads * k.shape[2])
    return x, f"SmolLM2 keys from {acts}, layer {layer}, heads 0..{heads - 1} side by side ({x.shape[0]} tokens)"


def dictionary(train: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(train.shape[0], generator=gen)[:n]
    atoms = train[pick]
    return atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)


def best_time(fn, reps: int):
    """(fastest of reps + 1 runs in seconds, the last run's result); the extra run absorbs warm-up."""
    times, out = [], None
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def rel_err(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / x.pow(2).sum())


def sklearn_omp(x: torch.Tensor, atoms: torch.Tensor, s: int) -> tuple[float, torch.Tensor]:
    """Seconds for orthogonal_mp_gram on x [B, D] (Gram and Xy precomputed), and x̂ [B, D]."""
    from sklearn.linear_model import orthogonal_mp_gram

    a = atoms.double().numpy()
    g = a @ a.T
    xy = a @ x.double().numpy().T  # [N, B]
    t0 = time.perf_counter()
    codes = orthogonal_mp_gram(g, xy, n_nonzero_coefs=s)  # [N, B]
    sec = time.perf_counter() - t0
    return sec, torch.from_numpy(np.ascontiguousarray(codes.T) @ a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer vectors and repeats (about a minute on 2 cores)")
    ap.add_argument("--acts", type=Path, help="activation dir from `csrtool collect` (default: synthetic data)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice; use 1 on a busy shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vectors, sk_vectors, reps = (2048, 32, 1) if args.quick else (16384, 256, 3)
    n_train = 8192
    results, data_notes = [], {}
    torch.manual_seed(0)
    for d in (64, 128):
        if args.acts:
            allx, note = real(args.acts, vectors + n_train, d)
        else:
            allx = synthetic(vectors + n_train, d, seed=d)
            note = f"synthetic correlated Gaussian (decaying spectrum, random rotation), D={d}"
        data_notes[str(d)] = note
        n_fit = min(n_train, allx.shape[0] - vectors)  # small activation sets: fewer training vectors
        if n_fit < 1024:
            raise SystemExit(f"--acts has only {allx.shape[0]} vectors at D={d}; collect more tokens")
        train, x = allx[:n_fit], allx[n_fit : n_fit + vectors].contiguous()
        for n in (1024, 4096):
            atoms = dictionary(train, n, seed=n + d)
            gram_s, g = best_time(lambda: pursuit.gram(atoms), 0)
            t_one, _ = best_time(lambda: x @ atoms.T, reps)
            step = max(256, (1 << 18) // n)  # the engine's default chunk
            t_chunked, _ = best_time(lambda: [x[i : i + step] @ atoms.T for i in range(0, x.shape[0], step)], reps)
            t_gemm = min(t_one, t_chunked)
            for s in (4, 8):
                row = dict(N=n, D=d, S=s, vectors=x.shape[0])
                results.append(dict(method="gemm-bound", **row, vectors_per_s=x.shape[0] / t_gemm, rel_err=None, ratio_vs_gemm=1.0, speedup_vs_sklearn=None))
                sub = x[:sk_vectors]
                sk_s, sk_hat = sklearn_omp(sub, atoms, s)
                sk_vps = sub.shape[0] / sk_s
                for method in ("mp", "omp"):
                    t, (idx, coef) = best_time(lambda: pursuit.encode(x, atoms, s, method, gram=g), reps)
                    x_hat = pursuit.decode(idx, coef, atoms)
                    results.append(
                        dict(method=method, **row, vectors_per_s=x.shape[0] / t, rel_err=rel_err(x, x_hat),
                             rel_err_sklearn_subset=rel_err(sub, x_hat[: sub.shape[0]]), ratio_vs_gemm=t / t_gemm,
                             speedup_vs_sklearn=(x.shape[0] / t) / sk_vps, gram_s=gram_s)
                    )
                results.append(dict(method="sklearn-omp", N=n, D=d, S=s, vectors=sub.shape[0], vectors_per_s=sk_vps,
                                    rel_err=rel_err(sub, sk_hat), ratio_vs_gemm=(sub.shape[0] / sk_vps) / (sub.shape[0] / x.shape[0] * t_gemm),
                                    speedup_vs_sklearn=1.0))
    out = {
        "results": results,
        "data": data_notes,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "notes": "rel_err = sum|x-x^|^2/sum|x|^2 over the coded vectors; sklearn rows are on the first `vectors` of the same "
        "set, and mp/omp rows give rel_err_sklearn_subset on that subset. Gram (and sklearn's Xy) precomputed outside the timing; "
        "our one-off Gram cost is gram_s. ratio_vs_gemm = time per vector / GEMM time per vector (lower is better).",
    }
    print(f"{'method':<12}{'N':>6}{'D':>5}{'S':>3}{'vectors':>9}{'vec/s':>12}{'rel_err':>9}{'x GEMM':>8}{'vs sklearn':>11}")
    for r in results:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.4f}"
        sp = "" if r["speedup_vs_sklearn"] is None else f"{r['speedup_vs_sklearn']:.0f}x"
        print(f"{r['method']:<12}{r['N']:>6}{r['D']:>5}{r['S']:>3}{r['vectors']:>9}{r['vectors_per_s']:>12,.0f}{err:>9}{r['ratio_vs_gemm']:>8.2f}{sp:>11}")
    print(f"data: {data_notes}; threads: {out['threads']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
