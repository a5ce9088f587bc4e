"""Why compress caps the sparsity at half the channels (codec.max_sparsity): OMP near full rank.

Codes 512 held-out-free activation tokens of one layer's keys with the demo dictionaries at
S = D/2 .. D and prints the relative squared error per coefficient format and the largest
|coefficient| (the fp16 row is the peer measured in the same run). Writes JSON.

    python bench/sparsity_cap.py --acts /work/demo-out/acts --dicts /work/demo-out/dicts.safetensors --layer 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open

from csrtool import codec
from csrtool.formats.dicts import load_dicts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acts", type=Path, required=True)
    ap.add_argument("--dicts", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    ds = load_dicts(a.dicts)
    atoms, mean = ds.get(a.layer, "k"), ds.mean(a.layer, "k")
    with safe_open(str(a.acts / "shard-00000.safetensors"), "pt") as fh:
        x = fh.get_tensor(f"layer.{a.layer}.k")[: a.tokens].float().permute(1, 0, 2)[None]  # [1, H, T, D]
    d = x.shape[-1]
    rows = []
    for s in sorted({d // 2, 3 * d // 4, 7 * d // 8, d - 1, d}):
        _, c = codec.encode_codes(codec.shift(x, mean, -1.0), atoms, s, "omp")
        row = {"sparsity": s, "max_abs_coef": float(c.abs().max())}
        for coef in codec.COEF_FORMATS:
            y = codec.roundtrip(x, atoms, s, coef, "omp", mean)
            row[f"rel_err_{coef}"] = float((x - y).pow(2).sum() / x.pow(2).sum())
        rows.append(row)
        print(row)
    if a.json:
        a.json.write_text(json.dumps({"layer": a.layer, "tokens": a.tokens, "head_dim": d, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
