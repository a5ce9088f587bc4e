"""Why `quanto2` is so far behind KIVI-2: the quantisation axis of transformers' QuantizedCache.

transformers' quanto cache quantises keys and values with axis 0 by default: quanto then
groups each token's channels (for head_dim 64, one group of 64 per token and head), i.e.
per-token key quantisation, which KIVI showed collapses at 2 bits (a few outlier channels
set every token's range). axis -1 groups along the tokens instead (per channel, KIVI's
choice for keys). This runs the eval's own passes (eval.runner, same tokens, chunks,
window as `csrtool eval`'s defaults) for the three axis settings at 2 bits, plus the
default 4-bit row, against the same reference.

    PYTHONPATH=$PWD .venv/bin/python bench/quanto_axis.py --json quanto_axis.json [--tokens 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from transformers import QuantizedCache

    from csrtool.collect import tokenize
    from csrtool.corpus import builtin_text
    from csrtool.eval import quanto, runner
    from csrtool.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    missing = quanto.backend_missing("quanto")
    if missing:
        raise SystemExit(missing)

    class Axis(quanto.QuantizedCacheMethod):
        def __init__(self, nbits: int, axis_key: int, axis_value: int):
            super().__init__("quanto", nbits, a.window, name=f"quanto{nbits} axis_key={axis_key} axis_value={axis_value}")
            self.axis_key, self.axis_value = axis_key, axis_value

        def make_cache(self, model):
            return QuantizedCache(
                backend="quanto", config=model.config, nbits=self.nbits, q_group_size=self.q_group_size,
                residual_length=self.residual_length, axis_key=self.axis_key, axis_value=self.axis_value,
            )

    loaded = load_model("smollm2-135m", "cpu", "auto")
    model = loaded.model
    ids = tokenize(loaded.tokenizer, builtin_text("heldout"))[: a.tokens][None]
    ref = runner.reference_pass(model, ids, a.chunk)
    rows = []
    for nbits, ak, av in ((2, 0, 0), (2, -1, 0), (2, -1, -1), (4, 0, 0)):
        r = runner.method_pass(model, ids, Axis(nbits, ak, av), ref, a.chunk, a.window)
        rows.append({"method": r.name, "nbits": nbits, "axis_key": ak, "axis_value": av, "ppl": r.ppl, "dppl": r.ppl / ref.ppl - 1, "kl": r.kl})
        print(f"{r.name}: ppl {r.ppl:.3f} (reference {ref.ppl:.3f}), Δppl {100 * (r.ppl / ref.ppl - 1):+.1f}%", flush=True)
    doc = {"config": vars(a) | {"json": str(a.json)}, "reference_ppl": ref.ppl, "rows": rows, "default": "axis_key=0, axis_value=0 (transformers)"}
    a.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
