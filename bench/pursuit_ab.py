"""The tree's pursuit engine against another version of it, in one process: same inputs, same codes?, seconds.

    git show REV:csrtool/engine/pursuit.py > /tmp/pursuit_ref.py
    .venv/bin/python bench/pursuit_ab.py --reference /tmp/pursuit_ref.py --json bench/pursuit_ab.json

Cases (OMP, 8,192 unit atoms of width 64, the engine's default chunking and form): the demo's
adaptive compress sizes (6,144 vectors = 2,048 tokens x 3 KV heads, at 13 and 26 atoms: the
1-bit keys' sparsity and the adaptive codes' maximum, twice it), train-dict's cross-layer settle (32,768 vectors
at 4 atoms), and eval's batches (192 vectors = one 64-token chunk x 3 KV heads, at 13 and 26 atoms: the direct
form, timed over 32 calls). Each case times both versions alternately, best of --repeat, and checks the indices
are equal and the coefficients within 1e-5 (same_codes) and whether both are equal bit for bit (bitwise).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from csrtool.engine import pursuit

CASES = [(6144, 13), (6144, 26), (32768, 4), (192, 13), (192, 26)]  # (vectors, atoms per vector)


def load_reference(path: Path):
    spec = importlib.util.spec_from_file_location("pursuit_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="another version's csrtool/engine/pursuit.py")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ref = load_reference(args.reference)
    gen = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(1, 8192, 64, generator=gen), dim=2)
    rows = []
    for b, s in CASES:
        x = torch.randn(1, b, 64, generator=gen)
        times: dict[str, list[float]] = {"reference": [], "tree": []}
        out = {}
        calls = 32 if b < 1024 else 1  # small batches: time a run of calls, as eval makes them
        for _ in range(args.repeat):
            for name, mod in (("reference", ref), ("tree", pursuit)):
                t0 = time.perf_counter()
                for _ in range(calls):
                    out[name] = mod.encode_groups(x, atoms, s, "omp")
                times[name].append((time.perf_counter() - t0) / calls)
        same = bool(torch.equal(out["reference"][0], out["tree"][0])
                    and torch.allclose(out["reference"][1], out["tree"][1], rtol=1e-5, atol=1e-5))
        bitwise = all(torch.equal(r, t) for r, t in zip(out["reference"], out["tree"]))
        row = {"vectors": b, "sparsity": s, "atoms": 8192, "reference_s": min(times["reference"]), "tree_s": min(times["tree"]),
               "same_codes": same, "bitwise": bitwise}
        row["speedup"] = row["reference_s"] / row["tree_s"]
        rows.append(row)
        print(f"{b} vectors x {s} atoms: reference {row['reference_s']:.3f} s, tree {row['tree_s']:.3f} s "
              f"({row['speedup']:.2f}x), same codes: {same}, bit for bit: {bitwise}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
