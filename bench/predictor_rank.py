"""Could one short code per token stand for every layer's prediction? A screen by residual energy.

The live cache holds each distinct token's prediction for every predicted layer and side (about
half a dense float16 token, docs/generate.md). This screen fits the token predictor's maps on a
collection (--acts, as train-dict does), stacks each distinct calibration token's exact
predictions over all layers and sides, each block divided by the RMS norm of its vectors (so every
block counts in relative terms), and keeps their top r principal directions (weighted by the
tokens' counts). On the first 1,024 tokens of each text it reports, per layer and side,
Σ‖x − pred‖² / Σ‖x − μ‖² for the full predictions (r = 0) and for their rank-r projections: no
dictionary, the prediction alone (docs/quality.md, eighth pass, "Not done").

    python bench/predictor_rank.py --acts ACTS --ranks 32,64,128,256,512 --json rank.json
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
from csrtool.formats.acts import ActsReader  # noqa: E402
from csrtool.models import load_model  # noqa: E402
from csrtool.predictor import TokenPredictor, exact_map, fit_map  # noqa: E402

TEXTS = {"held": None, "gpl": "/usr/share/common-licenses/GPL-3", "vim": "/usr/share/vim/vim90/doc/pattern.txt"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts", required=True, type=Path)
    ap.add_argument("--ranks", default="32,64,128,256,512")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ranks = [int(r) for r in args.ranks.split(",")]
    reader = ActsReader(args.acts)
    ids = reader.ids()
    loaded = load_model(reader.manifest["model"], "cpu", "float32")
    tp = TokenPredictor.for_model(loaded, "pre-rope")
    texts = {}
    for name, path in TEXTS.items():
        t_ids = tokenize(loaded.tokenizer, builtin_text("heldout") if path is None else read_text_file(Path(path)))[: args.tokens]
        with torch.no_grad():
            keys, values = capture_kv(loaded.model, t_ids[None], "pre-rope", key_rope(loaded.model, "pre-rope"))
        texts[name] = (t_ids, {"k": keys, "v": values})
    uniq, counts = torch.unique(ids, return_counts=True)
    blocks, calib, stacked = [], [], {n: [] for n in texts}
    for layer in reader.layers:
        for kind in ("k", "v"):
            x = reader.load(layer, kind)  # [T, H, D]
            a = fit_map(x, tp.kv(layer, kind, ids))
            mu = x.mean(0)
            w = float((x - mu).pow(2).sum(-1).mean()) ** 0.5
            blocks.append((layer, kind, mu, w))
            calib.append(exact_map(tp.kv(layer, kind, uniq), a).transpose(0, 1).reshape(len(uniq), -1) / w)
            for n, (t_ids, _) in texts.items():
                stacked[n].append(exact_map(tp.kv(layer, kind, t_ids), a).transpose(0, 1).reshape(len(t_ids), -1) / w)
    y = torch.cat(calib, 1).double()
    wts = counts.double() / counts.sum()
    mean = (wts[:, None] * y).sum(0)
    _, sv, vh = torch.linalg.svd((y - mean) * wts.sqrt()[:, None], full_matrices=False)
    out = {"energy_kept": {r: float(sv[:r].pow(2).sum() / sv.pow(2).sum()) for r in ranks}, "texts": {}}
    print("calibration energy kept:", {r: round(v, 3) for r, v in out["energy_kept"].items()})
    for n, (t_ids, kv) in texts.items():
        full = torch.cat(stacked[n], 1).double()
        per_rank = {}
        for r in [0] + ranks:
            proj = full if r == 0 else mean + (full - mean) @ vh[:r].T @ vh[:r]
            col, errs = 0, {}
            for layer, kind, mu, w in blocks:
                x = kv[kind][layer][0].transpose(0, 1).double()  # [T, H, D]
                width = x.shape[1] * x.shape[2]
                pred = (proj[:, col : col + width] * w).reshape(x.shape)
                col += width
                errs[f"{layer}.{kind}"] = float((x - pred).pow(2).sum() / (x - mu.double()).pow(2).sum())
            per_rank[r] = errs
        out["texts"][n] = per_rank
        print(n, "mean residual by rank:", {r: round(sum(e.values()) / len(e), 4) for r, e in per_rank.items()}, flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
