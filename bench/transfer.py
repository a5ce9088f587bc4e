"""Dictionary transfer: held-out relative error of each dictionary file on each activation set.

For every --dicts file (layer-scope dictionaries, value_split 1) and every --acts
directory (e.g. the built-in held-out text and a text of a domain absent from
calibration, collected with the same key space), the vectors of each layer and
kind minus the dictionary's stored mean are coded with OMP at each --sparsity;
Σ‖x − x̂‖² / Σ‖x‖² is reported per layer/kind and as the mean over them.
Activation sets to measure on are collected with
`csrtool collect -t FILE --max-tokens 2048 --layers 3,15,28 -o DIR`.

    python bench/transfer.py --dicts a.safetensors --dicts b.safetensors --acts held=DIR1 --acts ood=DIR2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool.engine import pursuit  # noqa: E402
from csrtool.engine.neuraldict import rel_err  # noqa: E402
from csrtool.formats.acts import ActsReader  # noqa: E402
from csrtool.formats.dicts import load_dicts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dicts", action="append", default=[], type=Path)
    ap.add_argument("--acts", action="append", default=[], help="NAME=DIR")
    ap.add_argument("--sparsity", default="4,8")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sets = [(name, ActsReader(Path(d))) for name, d in (a.split("=", 1) for a in args.acts)]
    rows = []
    for path in args.dicts:
        ds = load_dicts(path)
        for set_name, reader in sets:
            for layer in [la for la in reader.layers if la in ds.layers]:
                for kind in ("k", "v"):
                    atoms = ds.get(layer, kind)[0, 0].float()  # [N, D]
                    x = reader.load(layer, kind).float()  # [T, H, D]
                    mu = ds.mean(layer, kind)
                    if mu is not None:
                        x = x - mu[0].float()
                    x = x.reshape(-1, x.shape[-1])
                    row = {"dicts": str(path), "acts": set_name, "layer": layer, "kind": kind}
                    for s in [int(v) for v in args.sparsity.split(",")]:
                        idx, coef = pursuit.encode(x, atoms, s, "omp")
                        row[f"s{s}"] = rel_err(x, pursuit.decode(idx, coef, atoms))
                    rows.append(row)
                    print(f"{path.name:24s} {set_name:8s} layer {layer:2d} {kind}  " + "  ".join(
                        f"S={s} {row[f's{s}']:.4f}" for s in args.sparsity.split(",")), flush=True)
    for path in args.dicts:
        for set_name, _ in sets:
            mine = [r for r in rows if r["dicts"] == str(path) and r["acts"] == set_name]
            print(f"{path.name:24s} {set_name:8s} mean   " + "  ".join(
                f"S={s} {sum(r[f's{s}'] for r in mine) / len(mine):.4f}" for s in args.sparsity.split(",")))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
