"""Generalisation screen: Δppl of CSR (each --dicts, at each --bits) and KIVI-2 on several documents, one model load.

Documents: `heldout:I` is the I-th run of --tokens tokens of the built-in
corpus's held-out part (never calibrated on); every --text FILE is one more
document (e.g. text of a domain absent from the calibration data, kept aside
as a check). Same chunking, window, sink and accounting as `csrtool eval`.
Point estimates per document (no intervals): a screen, not a verdict.

    python bench/generalise.py --dicts out/dicts.safetensors --heldout-docs 2 \
        --text /usr/share/common-licenses/GPL-3 --json out/bench/generalise.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool.corpus import load_text, read_text_file  # noqa: E402
from csrtool.eval import kivi, runner  # noqa: E402
from csrtool.eval.csr import CSR  # noqa: E402
from csrtool.formats.dicts import load_dicts  # noqa: E402
from csrtool.models import kv_shape, load_model, rope_info  # noqa: E402


def documents(tokenizer, n_heldout: int, texts: list[Path], tokens: int) -> list[tuple[str, torch.Tensor]]:
    """(name, ids [1, tokens]) per document."""
    docs = []
    held = tokenizer(load_text(None, "heldout"), add_special_tokens=False).input_ids
    for i in range(n_heldout):
        docs.append((f"heldout:{i}", held[i * tokens : (i + 1) * tokens]))
    for path in texts:
        docs.append((path.name, tokenizer(read_text_file(path), add_special_tokens=False).input_ids[:tokens]))
    for name, ids in docs:
        if len(ids) < tokens:
            raise SystemExit(f"{name} has only {len(ids)} tokens, fewer than --tokens {tokens}")
    return [(name, torch.tensor([ids], dtype=torch.long)) for name, ids in docs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dicts", action="append", default=[], type=Path)
    ap.add_argument("--bits", default="1,2")
    ap.add_argument("--heldout-docs", type=int, default=2)
    ap.add_argument("--text", action="append", default=[], type=Path)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    loaded = load_model("smollm2-135m", "auto", "auto")
    n_layers, heads, head_dim = kv_shape(loaded.config)
    rope = rope_info(loaded.model)
    sets = [(path, load_dicts(path)) for path in args.dicts]
    bits = [float(b) for b in args.bits.split(",")]
    rows = []
    for name, ids in documents(loaded.tokenizer, args.heldout_docs, args.text, args.tokens):
        ref = runner.reference_pass(loaded.model, ids, args.chunk)
        methods = [("", kivi.KIVI(2))]
        methods += [(str(path), CSR(ds, n_layers, heads, head_dim, bits=b, method="omp", coef="fp8", rope_info=rope))
                    for path, ds in sets for b in bits]
        for path, m in methods:
            res = runner.method_pass(loaded.model, ids, m, ref, args.chunk, args.window, sink=args.sink)
            rows.append({"doc": name, "method": m.name, "dicts": path, "ref_ppl": ref.ppl, "ppl": res.ppl,
                         "dppl": res.ppl / ref.ppl - 1, "kl": res.kl, "top1": res.top1})
            print(f"{name:16s} {m.name:16s} {Path(path).name if path else '':28s} ref {ref.ppl:7.3f}  ppl {res.ppl:7.3f}  "
                  f"d {100 * rows[-1]['dppl']:+6.1f}%  KL {res.kl:.4f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
