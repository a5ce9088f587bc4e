"""k-means++ seeding: the sequential loop against batched rounds, same data, same Lloyd steps.

For each layer and kind of an activation directory, one layer-scope dictionary
(all KV heads stacked, centred, as `train-dict --scope layer --epochs 0`) is
seeded each way from the first (1 - heldout) of the tokens (at most
--max-vectors rows) and refined by the same Lloyd steps; the relative error
Σ‖x − x̂‖² / Σ‖x‖² of OMP codes on the held-out tokens and the seeding and
k-means times are reported, with the batched/sequential ratios.

    python bench/seeding.py --acts out/acts --layers 3,8,15,24,28 --json out/bench/seeding.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool.engine import kmeans as km  # noqa: E402
from csrtool.engine import pursuit  # noqa: E402
from csrtool.engine.neuraldict import rel_err  # noqa: E402
from csrtool.formats.acts import ActsReader  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts", type=Path, default=Path("out/acts"))
    ap.add_argument("--layers", default="3,8,15,24,28")
    ap.add_argument("--atoms", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=4, help="Lloyd steps after seeding (TrainConfig.kmeans_iters)")
    ap.add_argument("--rounds", default="64", help="comma-separated seeding rounds of the batched variant")
    ap.add_argument("--max-vectors", type=int, default=16384)
    ap.add_argument("--heldout", type=float, default=0.25)
    ap.add_argument("--sparsity", default="4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reader = ActsReader(args.acts)
    variants = [("sequential", None)] + [(f"batched-{r}", int(r)) for r in args.rounds.split(",")]
    rows = []
    for layer in [int(v) for v in args.layers.split(",")]:
        for kind in ("k", "v"):
            x = reader.load(layer, kind).float()  # [T, H, D]
            cut = int(round(x.shape[0] * (1 - args.heldout)))
            train, test = x[:cut].reshape(-1, x.shape[2]), x[cut:].reshape(-1, x.shape[2])
            mu = train.mean(0)
            g = torch.Generator().manual_seed(layer)
            train = (train - mu)[torch.randperm(train.shape[0], generator=g)[: args.max_vectors]]
            test = test - mu
            unit = km._normalize_rows(train)
            for name, rounds in variants:
                t0 = time.perf_counter()
                if rounds is None:
                    km.kmeans_pp(unit, args.atoms, torch.Generator().manual_seed(1), signed=True)
                else:
                    km.kmeans_pp_batched(unit, args.atoms, rounds, torch.Generator().manual_seed(1), signed=True)
                t_seed = time.perf_counter() - t0
                t0 = time.perf_counter()
                atoms = km.kmeans(train, args.atoms, args.iters, torch.Generator().manual_seed(1), seed_rounds=rounds)
                t_km = time.perf_counter() - t0
                row = {"layer": layer, "kind": kind, "variant": name, "seed_s": t_seed, "kmeans_s": t_km,
                       "train_vectors": train.shape[0], "test_vectors": test.shape[0]}
                for s in [int(v) for v in args.sparsity.split(",")]:
                    idx, coef = pursuit.encode(test, atoms, s, "omp")
                    row[f"rel_err_s{s}"] = rel_err(test, pursuit.decode(idx, coef, atoms))
                rows.append(row)
                errs = "  ".join(f"S={s} {row[f'rel_err_s{s}']:.4f}" for s in args.sparsity.split(","))
                print(f"layer {layer:2d} {kind} {name:12s} seed {t_seed:6.2f} s  k-means {t_km:6.2f} s  {errs}", flush=True)
    base = {(r["layer"], r["kind"]): r for r in rows if r["variant"] == "sequential"}
    summary = {}
    for name, _ in variants[1:]:
        mine = [r for r in rows if r["variant"] == name]
        summary[name] = {key: sum(r[key] / base[(r["layer"], r["kind"])][key] for r in mine) / len(mine)
                         for key in ["seed_s", "kmeans_s"] + [f"rel_err_s{s}" for s in args.sparsity.split(",")]}
        print(f"{name}: mean ratio to sequential " + "  ".join(f"{k} {v:.3f}" for k, v in summary[name].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows, "ratios": summary}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
