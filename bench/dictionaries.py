"""Dictionary quality on held-out tokens: NeuralDict vs k-means-only, random samples and faiss PQ.

For each layer and kind (K, V) of an activation directory, every KV head's
dictionary is trained on the first (1 - heldout) of the tokens and evaluated on
the rest; the relative error Σ‖x − x̂‖² / Σ‖x‖² is pooled over heads. Bits are
payload bits per vector: sparse codes store S × (log2 N index + 8-bit fp8 e4m3
coefficient; coefficients are rounded to fp8 here), PQ stores M × nbits.

    python bench/dictionaries.py --acts out/acts --json out/bench/dictionaries.json [--quick]

Without --acts: out/acts if it has a manifest, else a synthetic structured set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csrtool.formats.acts import ActsReader  # noqa: E402
from csrtool.engine import pursuit  # noqa: E402
from csrtool.engine.neuraldict import TrainConfig, rel_err, train_dictionary  # noqa: E402


def synthetic(t: int = 4096, h: int = 3, d: int = 64, seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind in "kv":
        base = torch.nn.functional.normalize(torch.randn(h, 2048, d, generator=g), dim=2)
        idx = torch.randint(2048, (t, h, 5), generator=g)
        coef = torch.randn(t, h, 5, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3])
        out[(0, kind)] = (coef[..., None] * base[torch.arange(h)[None, :, None], idx]).sum(2) + 0.1 * torch.randn(t, h, d, generator=g)
    return out


def code_error(test: torch.Tensor, atoms: torch.Tensor, s: int) -> tuple[float, float]:
    """(Σ‖x − x̂‖², Σ‖x‖²) with OMP codes and fp8 e4m3 coefficients."""
    idx, coef = pursuit.encode(test, atoms, s, "omp")
    coef = coef.to(torch.float8_e4m3fn).float()
    x_hat = pursuit.decode(idx, coef, atoms)
    return float((test - x_hat).double().pow(2).sum()), float(test.double().pow(2).sum())


def pq_error(train: torch.Tensor, test: torch.Tensor, m: int, nbits: int) -> tuple[float, float]:
    import faiss

    pq = faiss.ProductQuantizer(train.shape[1], m, nbits)
    pq.train(train.numpy().astype("float32"))
    x_hat = torch.from_numpy(pq.decode(pq.compute_codes(test.numpy().astype("float32"))))
    return float((test - x_hat).double().pow(2).sum()), float(test.double().pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acts", type=Path, default=None, help="activation directory (csrtool collect)")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--quick", action="store_true", help="layers 2, 15, 28 and head 0 only")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: all, or 2,15,28 with --quick)")
    ap.add_argument("--atoms", type=int, default=1024)
    ap.add_argument("--sparsity", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--heldout", type=float, default=0.25, help="fraction of tokens (the last ones) held out")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        faiss = None

    acts = args.acts or (ROOT / "out" / "acts" if (ROOT / "out" / "acts" / "manifest.json").is_file() else None)
    if acts is not None:
        reader = ActsReader(acts)
        have = reader.layers
        if args.layers:
            layers = [int(v) for v in args.layers.split(",")]
        elif args.quick:
            layers = [layer for layer in (2, 15, 28) if layer in have] or have[:1]
        else:
            layers = have
        source = str(acts)
        load = lambda layer, kind: reader.load(layer, kind)  # noqa: E731
    else:
        data = synthetic()
        layers, source = [0], "synthetic"
        load = lambda layer, kind: data[(layer, kind)]  # noqa: E731

    n, idx_bits, coef_bits = args.atoms, math.ceil(math.log2(args.atoms)), 8
    cfg = TrainConfig(atoms=n, sparsity=4, epochs=3, max_vectors=8192)
    results, t0 = [], time.time()
    for layer in layers:
        for kind in ("k", "v"):
            x = load(layer, kind)  # [T, H, D]
            t, h, d = x.shape
            cut = int(round(t * (1 - args.heldout)))
            heads = [0] if args.quick else list(range(h))
            acc: dict[tuple, list[float]] = {}
            for head in heads:
                train, test = x[:cut, head].contiguous(), x[cut:, head].contiguous()
                seed = 1000 * layer + 10 * head + (kind == "v")
                dicts = {
                    "neuraldict": train_dictionary(train, cfg, seed=seed)[0],
                    "kmeans-only": train_dictionary(train, TrainConfig(atoms=n, epochs=0, max_vectors=8192), seed=seed)[0],
                    "random-samples": train_dictionary(train, TrainConfig(atoms=n, epochs=0, init="samples", max_vectors=8192), seed=seed)[0],
                }
                for method, atoms in dicts.items():
                    for s in args.sparsity:
                        e = code_error(test, atoms, s)
                        a = acc.setdefault((method, n, s, s * (idx_bits + coef_bits)), [0.0, 0.0])
                        a[0] += e[0]
                        a[1] += e[1]
                if faiss is not None:
                    for m, nbits in ((8, 8),):
                        e = pq_error(train, test, m, nbits)
                        a = acc.setdefault((f"faiss-pq{m}x{nbits}", 2**nbits, 0, m * nbits), [0.0, 0.0])
                        a[0] += e[0]
                        a[1] += e[1]
            for (method, n_, s, bits), (num, den) in acc.items():
                results.append({"method": method, "layer": layer, "kind": kind, "N": n_, "D": d, "S": s,
                                "bits_per_vector": bits, "bits_per_channel": bits / d, "rel_err": num / den,
                                "heads": len(heads), "train_tokens": cut, "test_tokens": t - cut})
            print(f"layer {layer} {kind}: done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    from rich.console import Console
    from rich.table import Table

    cols = sorted({(r["method"], r["S"], r["bits_per_channel"]) for r in results}, key=lambda c: (c[2], c[0]))
    table = Table(title=f"held-out relative error, {source} (last {args.heldout:.0%} of tokens)")
    table.add_column("layer/kind")
    for method, s, bpc in cols:
        table.add_column(f"{method}{f' S={s}' if s else ''}\n{bpc:.3f} b/ch", justify="right")
    for layer in layers:
        for kind in ("k", "v"):
            row = {(r["method"], r["S"]): r["rel_err"] for r in results if r["layer"] == layer and r["kind"] == kind}
            table.add_row(f"{layer} {kind}", *(f"{row[(m, s)]:.4f}" for m, s, _ in cols))
    Console(width=240).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"source": source, "config": cfg.to_dict(), "seconds": time.time() - t0,
                                         "results": results}, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
