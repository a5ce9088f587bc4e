"""Screen for issue 12: per-token adaptive sparsity vs one sparsity for every token, same average bits.

For each layer side, every vector is coded with OMP at S = 1..--max-sparsity (OMP is greedy,
so the S-atom code is the first S steps of a longer one); the fixed row uses S̄ atoms for
every vector, the adaptive row gives each vector S_t atoms, S_t = argmin_S err_t(S) + λ·S,
with λ set so the mean S_t is S̄ minus the count's cost (a --count-bits field per vector,
charged at the bits of one atom: log2 N index bits + 8 coefficient bits). Errors are
Σ‖x − x̂‖² / Σ‖x‖² over the vectors (code space, the dictionary's mean subtracted), for each
activation set given (e.g. held-out text of the calibration domain and text of another).

    PYTHONPATH=$PWD .venv/bin/python bench/adaptive_sparsity.py --dicts D --acts held=DIR --acts other=DIR --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def errors_by_sparsity(xc: torch.Tensor, atoms: torch.Tensor, smax: int) -> torch.Tensor:
    """Squared error per vector for S = 1..smax: [smax, vectors]."""
    from csrtool import codec

    rows = []
    for s in range(1, smax + 1):
        idx, cf = codec.encode_codes(xc, atoms, s, "omp")
        rows.append(((xc - codec.decode_codes(idx, cf, atoms)) ** 2).sum(-1).reshape(-1))
    return torch.stack(rows)


def adaptive(num: torch.Tensor, target: float) -> torch.Tensor:
    """Per-vector S (1-based) minimising Σ err + λ·S with mean S <= target (bisection on λ)."""
    ks = torch.arange(1, num.shape[0] + 1, dtype=num.dtype)[:, None]
    lo, hi = 0.0, float(num.max()) + 1.0
    best = torch.ones(num.shape[1], dtype=torch.long)
    for _ in range(60):
        lam = (lo + hi) / 2
        st = (num + lam * ks).argmin(0) + 1
        if float(st.float().mean()) > target:
            lo = lam
        else:
            hi, best = lam, st
    return best


def main() -> None:
    from csrtool import codec
    from csrtool.formats.acts import ActsReader
    from csrtool.formats.dicts import load_dicts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dicts", type=Path, required=True)
    ap.add_argument("--acts", action="append", required=True, help="NAME=DIR, repeatable")
    ap.add_argument("--layers", default="3,15,28")
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--sparsities", default="2,4,8")
    ap.add_argument("--max-sparsity", type=int, default=12)
    ap.add_argument("--count-bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = load_dicts(a.dicts)
    sets = {n: ActsReader(Path(p)) for n, p in (s.split("=", 1) for s in a.acts)}
    atom_bits = math.log2(d.n_atoms) + 8
    rows = []
    for layer in (int(x) for x in a.layers.split(",")):
        for kind in ("k", "v"):
            atoms, mean = d.get(layer, kind), d.mean(layer, kind)
            for name, reader in sets.items():
                x = reader.load(layer, kind, max_tokens=a.tokens).to(torch.float32).permute(1, 0, 2)[None]  # [1, H, T, D]
                xc = codec.shift(x, mean, -1.0)
                total = float((xc**2).sum())
                num = errors_by_sparsity(xc, atoms, a.max_sparsity)
                for sbar in (int(s) for s in a.sparsities.split(",")):
                    st = adaptive(num, sbar - a.count_bits / atom_bits)
                    fixed = float(num[sbar - 1].sum()) / total
                    adapt = float(num.gather(0, (st - 1)[None]).sum()) / total
                    rows.append({"layer": layer, "kind": kind, "set": name, "sparsity": sbar, "fixed": fixed, "adaptive": adapt,
                                 "ratio": adapt / fixed, "mean_s": float(st.float().mean()), "max_s": int(st.max())})
                    print(f"layer {layer} {kind} {name} S={sbar}: fixed {fixed:.4f} adaptive {adapt:.4f} ({adapt / fixed:.3f}x)", flush=True)
    summary = {}
    for name in sets:
        for sbar in (int(s) for s in a.sparsities.split(",")):
            r = [x["ratio"] for x in rows if x["set"] == name and x["sparsity"] == sbar]
            summary[f"{name} S={sbar}"] = sum(r) / len(r)
    a.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(a).items()}, "rows": rows, "mean_ratio": summary}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
