"""Do the atoms code the tokens they were trained on better? Error of seen against unseen tokens.

The dictionary file records how many calibration tokens trained it (`source.tokens`, from the
built-in calibration text). For each --text, its first --tokens tokens are run through the model;
each layer's keys and values (in the dictionaries' key space, minus their stored mean) are coded
with OMP at --sparsity, and the relative error Σ‖x − x̂‖²/Σ‖x‖² is reported separately for the
tokens whose id occurs in those calibration tokens and for the rest (docs/quality.md, fifth pass).

    python bench/vocab_coverage.py --dicts out/dicts.safetensors --text held=builtin \
        --text gpl=/usr/share/common-licenses/GPL-3 --layers 0,2,4,8,15,28 --json coverage.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool.collect import capture_kv, key_rope, tokenize  # noqa: E402
from csrtool.corpus import BUILTIN_NAME, builtin_text, read_text_file  # noqa: E402
from csrtool.engine import pursuit  # noqa: E402
from csrtool.formats.dicts import load_dicts  # noqa: E402
from csrtool.models import load_model  # noqa: E402


def split_errors(x: torch.Tensor, atoms: torch.Tensor, mean: torch.Tensor | None, seen: torch.Tensor, s: int) -> tuple[float, float]:
    """x [H, T, D]: relative error of the tokens where seen [T] is True, and of the others."""
    xc = x - mean[0] if mean is not None else x
    flat = xc.reshape(-1, x.shape[-1])
    idx, coef = pursuit.encode(flat, atoms, s, "omp")
    err = (flat - pursuit.decode(idx, coef, atoms)).pow(2).sum(-1).reshape(x.shape[0], -1).sum(0)
    energy = x.pow(2).sum(-1).sum(0)
    return float(err[seen].sum() / energy[seen].sum()), float(err[~seen].sum() / energy[~seen].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dicts", required=True, type=Path)
    ap.add_argument("--text", action="append", default=[], help="NAME=FILE, or NAME=builtin for the built-in held-out text")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--layers", default="0,2,4,8,15,28")
    ap.add_argument("--sparsity", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ds = load_dicts(args.dicts)
    loaded = load_model(ds.source.get("model", "smollm2-135m"), "cpu", "float32")
    key_space = ds.source.get("key_space", "post-rope")
    if ds.source.get("text_source") != f"{BUILTIN_NAME}[calibration]":
        sys.exit(f"{args.dicts} was trained on {ds.source.get('text_source')!r}, not the built-in calibration text this bench re-tokenizes")
    calib = tokenize(loaded.tokenizer, builtin_text("calibration"))[: int(ds.source["tokens"])]
    vocab = set(calib.tolist())
    print(f"{len(vocab)} distinct ids in the {calib.numel()} calibration tokens", flush=True)
    rows = []
    for spec in args.text:
        name, path = spec.split("=", 1)
        text = builtin_text("heldout") if path == "builtin" else read_text_file(Path(path))
        ids = tokenize(loaded.tokenizer, text)[: args.tokens]
        seen = torch.tensor([i in vocab for i in ids.tolist()])
        with torch.no_grad():
            keys, values = capture_kv(loaded.model, ids[None], key_space, key_rope(loaded.model, key_space))
        row = {"text": name, "unseen_fraction": float((~seen).float().mean()), "layers": {}}
        for layer in [int(v) for v in args.layers.split(",")]:
            for kind, xs in (("k", keys), ("v", values)):
                atoms = ds.get(layer, kind)[0, 0].float()
                mean = ds.mean(layer, kind)
                pair = split_errors(xs[layer][0].float(), atoms, None if mean is None else mean.float(), seen, args.sparsity)
                row["layers"][f"{layer}.{kind}"] = {"seen": pair[0], "unseen": pair[1]}
        rows.append(row)
        print(f"{name}: unseen {row['unseen_fraction']:.3f}  " + "  ".join(
            f"{k} {v['seen']:.3f}/{v['unseen']:.3f}" for k, v in row["layers"].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"dicts": str(args.dicts), "calib_ids": len(vocab), "sparsity": args.sparsity, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
