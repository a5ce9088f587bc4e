"""Screen the token predictor by reconstruction: OMP error with and without it, per layer, on several texts.

For each --layers layer and kind, two dictionaries are trained with the default TrainConfig on
the same collected calibration vectors (--acts, a `csrtool collect` directory with token ids):
one on the vectors themselves (minus their mean), one on what the token predictor leaves
(csrtool.predictor: x − [p(t), 1]·A, A fitted by least squares on the same vectors). Each --text
(first --tokens tokens) is run through the model, and its vectors are coded with OMP at each
--sparsity by both. Reported: Σ‖x − x̂‖² / Σ‖x − μ‖² with μ the plain dictionary's mean, the same
denominator for both, so the numbers compare directly (docs/quality.md, sixth pass).

    python bench/predictor_screen.py --acts out/acts --layers 1,2,3,5,8,12,20,28 \
        --text held=builtin --text gpl=/usr/share/common-licenses/GPL-3 --json screen.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool.collect import capture_kv, key_rope, tokenize  # noqa: E402
from csrtool.corpus import builtin_text, read_text_file  # noqa: E402
from csrtool.engine import pursuit  # noqa: E402
from csrtool.engine.neuraldict import TrainConfig, train_dictionary  # noqa: E402
from csrtool.formats.acts import ActsReader  # noqa: E402
from csrtool.models import load_model  # noqa: E402
from csrtool.predictor import TokenPredictor, apply_map, fit_prediction  # noqa: E402


def train(x: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(atoms, mean) of a layer-scope dictionary trained on rows x [T, H, D] (a random subsample, as train-dict)."""
    flat = x.reshape(-1, x.shape[-1])
    rows = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_vectors]]
    mu = rows.mean(0)
    atoms, _ = train_dictionary(rows - mu, cfg, seed=cfg.seed)
    return atoms, mu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts", required=True, type=Path)
    ap.add_argument("--layers", default="1,2,3,5,8,12,20,28")
    ap.add_argument("--text", action="append", default=[], help="NAME=FILE, or NAME=builtin for the built-in held-out text")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--sparsity", default="1,2,4")
    ap.add_argument("--context", type=int, default=1, help="tokens each prediction reads (train-dict --predictor-context)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reader = ActsReader(args.acts)
    ids = reader.ids()
    if ids is None or reader.manifest.get("key_space") != "pre-rope":
        sys.exit(f"{args.acts}: collect with token ids and pre-RoPE keys (csrtool collect, this version)")
    loaded = load_model(reader.manifest["model"], "cpu", "float32")
    tp = TokenPredictor.for_model(loaded, "pre-rope", args.context)
    texts = []
    for spec in args.text:
        name, path = spec.split("=", 1)
        t_ids = tokenize(loaded.tokenizer, builtin_text("heldout") if path == "builtin" else read_text_file(Path(path)))[: args.tokens]
        with torch.no_grad():
            keys, values = capture_kv(loaded.model, t_ids[None], "pre-rope", key_rope(loaded.model, "pre-rope"))
        texts.append((name, t_ids, {"k": keys, "v": values}))
    cfg, rows = TrainConfig(), []
    for layer in [int(v) for v in args.layers.split(",")]:
        for kind in ("k", "v"):
            x = reader.load(layer, kind)
            a, fitted = fit_prediction(x, tp.kv(layer, kind, ids))
            plain, mu = train(x, cfg)
            pred, mu_r = train(x - fitted, cfg)
            for name, t_ids, kv in texts:
                xt = kv[kind][layer][0].transpose(0, 1).float()  # [T, H, D]
                d = xt.shape[-1]
                xc = (xt - mu).reshape(-1, d)
                r = (xt - apply_map(tp.kv(layer, kind, t_ids), a).transpose(0, 1) - mu_r).reshape(-1, d)
                energy = float(xc.pow(2).sum())
                row = {"layer": layer, "kind": kind, "text": name}
                for s in [int(v) for v in args.sparsity.split(",")]:
                    for label, vec, atoms in (("plain", xc, plain), ("predictor", r, pred)):
                        i, c = pursuit.encode(vec, atoms, s, "omp")
                        row[f"{label}_s{s}"] = float((vec - pursuit.decode(i, c, atoms)).pow(2).sum()) / energy
                rows.append(row)
                print(f"layer {layer:2d} {kind} {name:6s} " + "  ".join(
                    f"S={s} {row[f'plain_s{s}']:.3f} -> {row[f'predictor_s{s}']:.3f}" for s in args.sparsity.split(",")), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
