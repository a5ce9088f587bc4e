"""How much the int8 rounding of the token predictor's predictions loses, per layer and side.

For each map of a dictionary file trained with the token predictor, the exact predictions of the
first --tokens tokens of the built-in held-out text are rounded to int8 several ways, and the
error Σ‖round(v) − v‖² / Σ‖v‖² is reported (docs/quality.md, eighth pass):

    vector     one float16 absmax scale per vector (csrtool before channel scales)
    stored     divided first by the file's channel scales (the map's row D + 1): what csrtool does
    g16, g32   one scale per group of 16 / 32 channels (an alternative that costs bytes per row)

    python bench/prediction_rounding.py --dicts D [--model gemma3-270m] --json r.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool.collect import tokenize  # noqa: E402
from csrtool.corpus import builtin_text  # noqa: E402
from csrtool.formats.dicts import load_dicts, parse_dict_name  # noqa: E402
from csrtool.models import load_model  # noqa: E402
from csrtool.predictor import TokenPredictor, dequantize_prediction, exact_map, map_channels, quantize_prediction  # noqa: E402


def rounded(y: torch.Tensor, group: int, chan: torch.Tensor | None = None) -> torch.Tensor:
    """y [H, T, D] rounded to int8 with one scale per `group` channels (after dividing by chan [H, D])."""
    h, t, d = y.shape
    u = y if chan is None else y / chan[:, None, :]
    back = dequantize_prediction(*quantize_prediction(u.reshape(h, t, d // group, group))).reshape(h, t, d)
    return back if chan is None else back * chan[:, None, :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dicts", required=True, type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model, "cpu", "float32")
    dicts = load_dicts(args.dicts)
    if not dicts.predicted:
        sys.exit(f"{args.dicts} was trained without the token predictor")
    tp = TokenPredictor.for_dicts(loaded, dicts)
    ids = tokenize(loaded.tokenizer, builtin_text("heldout"))[: args.tokens]
    rows = {}
    for name, a in sorted(dicts.maps.items(), key=lambda kv: parse_dict_name(kv[0])):
        layer, kind = parse_dict_name(name)
        y = exact_map(tp.kv(layer, kind, ids), a)
        d = y.shape[-1]
        ways = {"vector": rounded(y, d), "g16": rounded(y, 16), "g32": rounded(y, 32)}
        if map_channels(a) is not None:
            ways["stored"] = rounded(y, d, map_channels(a))
        rows[name] = {k: float((v - y).pow(2).sum() / y.pow(2).sum()) for k, v in ways.items()}
        print(name, " ".join(f"{k} {v:.2e}" for k, v in rows[name].items()), flush=True)
    means = {kind: {k: sum(r[k] for n, r in rows.items() if n.endswith(kind)) / sum(n.endswith(kind) for n in rows)
                    for k in next(iter(rows.values()))} for kind in (".k", ".v")}
    for kind, m in means.items():
        print(f"mean {kind[1]}:", " ".join(f"{k} {v:.2e}" for k, v in m.items()))
    if args.json:
        args.json.write_text(json.dumps({"dicts": str(args.dicts), "model": args.model, "layers": rows, "mean": means}, indent=1))


if __name__ == "__main__":
    main()
