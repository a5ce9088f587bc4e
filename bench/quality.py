"""Quality sweep: perplexity of CSR settings and KIVI on the same held-out tokens, one model load.

The fast loop behind docs/quality.md. Same tokens, chunking and accounting as
`csrtool eval` (its runner, methods and memory accounting), but many settings
per run and no needle / PQ / QuantizedCache rows.

    python bench/quality.py --dicts out/dicts-pre.safetensors --csr s3/4,s2/5,b1 \
        --kivi 2 --sink 0,4 --json out/bench/quality.json

--csr items: `sK/V` explicit sparsities, `bX` the codec's choice at X bits.
Every item runs at every --sink value (KIVI too, for a fair comparison).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from csrtool.formats.dicts import load_dicts  # noqa: E402
from csrtool.eval import kivi, runner  # noqa: E402
from csrtool.eval.csr import CSR  # noqa: E402
from csrtool.eval.suite import memory, summarize  # noqa: E402
from csrtool.models import rope_info  # noqa: E402
from heldout import add_eval_args, heldout_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dicts", action="append", default=[], help="dictionary file(s); each --csr item runs on each")
    ap.add_argument("--csr", default="b1", help="comma-separated: sK/V (sparsities) or bX (bits)")
    ap.add_argument("--solver", default="omp")
    ap.add_argument("--coef", default="fp8")
    ap.add_argument("--kivi", default="2", help="comma-separated KIVI bit widths ('' for none)")
    ap.add_argument("--sink", default="0", help="comma-separated sink sizes")
    add_eval_args(ap)
    args = ap.parse_args()

    loaded, (n_layers, heads, head_dim), ids, ref = heldout_reference(args.tokens, args.chunk)
    model = loaded.model
    rope = rope_info(model)
    sinks = [int(s) for s in args.sink.split(",") if s.strip()]
    todo = []
    for b in [int(x) for x in args.kivi.split(",") if x.strip()]:
        todo.append(("kivi", lambda b=b: kivi.KIVI(b), None))
    for path in args.dicts:
        ds = load_dicts(Path(path))
        for item in [x.strip() for x in args.csr.split(",") if x.strip()]:
            if item.startswith("s"):
                sk, sv = (int(v) for v in item[1:].split("/"))
                make = lambda ds=ds, sk=sk, sv=sv: CSR(ds, n_layers, heads, head_dim, method=args.solver, coef=args.coef, rope_info=rope, sparsity=(sk, sv))
            else:
                bits = float(item[1:])
                make = lambda ds=ds, bits=bits: CSR(ds, n_layers, heads, head_dim, bits=bits, method=args.solver, coef=args.coef, rope_info=rope)
            todo.append(("csr", make, path))
    rows = []
    for kind, make, path in todo:
        for sink in sinks:
            m = make()
            res = runner.method_pass(model, ids, m, ref, args.chunk, args.window, sink=sink)
            summary, layers = summarize(res, n_layers)
            mem = memory(m, ids.shape[1], args.window + sink, n_layers, heads, head_dim)
            row = {
                "name": m.name, "dicts": path, "sink": sink, "window": args.window, "chunk": args.chunk, "tokens": ids.shape[1],
                "config": m.describe() if hasattr(m, "describe") else None,
                "bits": mem["bits_per_channel"], "bits_with_window": mem["bits_with_window"], "bits_total": mem["bits_total"],
                "ppl": res.ppl, "ref_ppl": ref.ppl, "dppl": res.ppl / ref.ppl - 1, "kl": res.kl, "top1": res.top1,
                "rel_err_k": summary["rel_err_k"], "rel_err_v": summary["rel_err_v"], "attn_err": summary["attn_err"],
                "seconds": res.seconds,
                "layers": [{k: r[k] for k in ("layer", "rel_err_k", "rel_err_v", "attn_err")} for r in layers],
            }
            rows.append(row)
            cfg = row["config"] or {}
            print(
                f"{m.name:16s} {Path(path).name if path else '':28s} s={cfg.get('sparsity_k', '-')}/{cfg.get('sparsity_v', '-')} sink={sink:<3d} "
                f"bits {row['bits']:.3f} (+win {row['bits_with_window']:.3f})  ppl {row['ppl']:.3f}  d {100 * row['dppl']:+.1f}%  "
                f"KL {row['kl']:.4f}  errK {row['rel_err_k']:.4f} errV {row['rel_err_v']:.4f}  attn {row['attn_err']:.4f}  {res.seconds:.0f}s",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "reference_ppl": ref.ppl, "rows": rows}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
