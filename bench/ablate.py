"""Where does CSR's perplexity loss come from? Compress one layer (or one kind) at a time.

Each item is a CSR setting applied to a subset of the cache only (every other
layer / kind stays exact), on the same held-out tokens, chunks and window as
`csrtool eval`. The per-layer increases tell how to spend a bit budget across
layers (docs/quality.md §5).

    python bench/ablate.py --dicts out/demo/dicts.safetensors --sparsity 5/2 --per-layer --json out/bench/ablate.json
    python bench/ablate.py --dicts D --bits 1 --kinds k --layers 0-29 --text /usr/share/common-licenses/GPL-3 --json k.json

--bits B uses compress's plan (calibrated per-layer sparsities, default adaptive codes) instead
of one --sparsity; --text FILE evaluates its first --tokens tokens instead of the built-in held-out text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from csrtool.formats.dicts import load_dicts  # noqa: E402
from csrtool.eval import runner  # noqa: E402
from csrtool.eval.csr import CSR  # noqa: E402
from csrtool.models import rope_info  # noqa: E402
from csrtool.predictor import TokenPredictor  # noqa: E402
from heldout import add_eval_args, heldout_reference  # noqa: E402


class Subset:
    """A method applied to some (layer, kind) pairs only; the rest stay exact."""

    def __init__(self, inner, layers: set[int], kinds: set[str], name: str):
        self.inner, self.layers, self.kinds, self.name = inner, layers, kinds, name
        self.bits_k, self.bits_v, self.side_bits = inner.bits_k, inner.bits_v, 0

    def reconstruct(self, layer, kind, x, positions, ids=None):
        if layer in self.layers and kind in self.kinds:
            return self.inner.reconstruct(layer, kind, x, positions, ids)
        return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dicts", required=True)
    ap.add_argument("--sparsity", default="5/2")
    ap.add_argument("--bits", type=float, default=None, help="compress's plan at this budget (adaptive codes) instead of --sparsity")
    ap.add_argument("--text", type=Path, default=None, help="a text file instead of the built-in held-out text")
    ap.add_argument("--solver", default="omp")
    ap.add_argument("--per-layer", action="store_true", help="one pass per layer, K and V compressed")
    ap.add_argument("--kinds", default="kv", help="kv, k or v: which kinds the subsets compress")
    ap.add_argument("--layers", default="", help="comma-separated layer subsets as a-b ranges, e.g. '0-9,10-19,20-29'")
    ap.add_argument("--sink", type=int, default=4)
    add_eval_args(ap)
    args = ap.parse_args()

    loaded, (n_layers, heads, head_dim), ids, ref = heldout_reference(args.tokens, args.chunk, args.text)
    model = loaded.model
    sk, sv = (int(v) for v in args.sparsity.split("/"))
    plan = {"sparsity": (sk, sv)} if args.bits is None else {"bits": args.bits, "adaptive": True}
    ds = load_dicts(Path(args.dicts))
    predictor = TokenPredictor.for_dicts(loaded, ds) if ds.predicted else None  # dictionaries of what the token predictor leaves
    csr = CSR(ds, n_layers, heads, head_dim, method=args.solver, rope_info=rope_info(model), predictor=predictor, **plan)
    subsets: list[tuple[str, set[int]]] = []
    if args.per_layer:
        subsets += [(f"L{i}", {i}) for i in range(n_layers)]
    for spec in [s for s in args.layers.split(",") if s.strip()]:
        a, _, b = spec.partition("-")
        subsets.append((f"L{spec}", set(range(int(a), int(b or a) + 1))))
    rows = []
    for label, layers in subsets:
        m = Subset(csr, layers, set(args.kinds), f"{label}-{args.kinds}")
        res = runner.method_pass(model, ids, m, ref, args.chunk, args.window, sink=args.sink)
        row = {"subset": label, "layers": sorted(layers), "kinds": args.kinds, "sparsity": [sk, sv] if args.bits is None else None, "bits": args.bits,
               "ppl": res.ppl, "dppl": res.ppl / ref.ppl - 1, "kl": res.kl, "top1": res.top1}
        rows.append(row)
        print(f"{m.name:12s} ppl {res.ppl:.3f} d {100 * row['dppl']:+.2f}% KL {res.kl:.4f} top1 {res.top1:.3f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "reference_ppl": ref.ppl, "rows": rows}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
