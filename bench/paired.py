"""Two eval runs of the same texts compared position by position: did a change of the codec move Δppl or KL?

Each run's own intervals (csrtool eval) say how far its Δppl is from the reference; two runs on the
same tokens (the same texts, model and budgets, e.g. before and after a codec change) share most of
their noise, so their difference has a much tighter interval than either. For every method in both
runs this reports B's perplexity over A's (the mean NLL change, as a ratio) and B's mean KL minus
A's, with 95% paired block-bootstrap intervals (the blocks of csrtool.eval.bootstrap, within
documents).

    csrtool eval ... --per-position --json a.json      (before)
    csrtool eval ... --per-position --json b.json      (after)
    python bench/paired.py a.json b.json [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool.eval.bootstrap import Resampler  # noqa: E402


def per_position(path: Path) -> dict:
    doc = json.loads(path.read_text())
    if "per_position" not in doc:
        sys.exit(f"{path}: no per-position block (run csrtool eval with --per-position)")
    return doc["per_position"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path, help="csrtool eval --per-position --json output (before)")
    ap.add_argument("b", type=Path, help="the same eval after the change")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    a, b = per_position(args.a), per_position(args.b)
    lengths = [d["scored"] for d in a["documents"]]
    if lengths != [d["scored"] for d in b["documents"]] or [d["name"] for d in a["documents"]] != [d["name"] for d in b["documents"]]:
        sys.exit("the two runs scored different documents: compare runs of the same eval")
    rs = Resampler(lengths)
    out = {}
    for name in sorted(set(a["methods"]) & set(b["methods"])):
        ma, mb = a["methods"][name], b["methods"][name]
        ppl = rs.ppl_increase(ma["nll"], mb["nll"])
        row = {"ppl_ratio": [1 + ppl.point, 1 + ppl.lo, 1 + ppl.hi]}
        if ma.get("kl") is not None and mb.get("kl") is not None:
            ka, kb = rs.mean(ma["kl"]), rs.mean(mb["kl"])
            dk = rs.mean([y - x for x, y in zip(ma["kl"], mb["kl"])])
            row.update(kl_a=ka.point, kl_b=kb.point, kl_change=[dk.point, dk.lo, dk.hi])
        out[name] = row
        kl = f"; KL {row['kl_a']:.4f} -> {row['kl_b']:.4f}, change {dk.point:+.4f} [{dk.lo:+.4f}, {dk.hi:+.4f}]" if "kl_change" in row else ""
        print(f"{name}: ppl B/A {100 * ppl.point:+.2f}% [{100 * ppl.lo:+.2f}, {100 * ppl.hi:+.2f}]{kl}")
    if args.json:
        args.json.write_text(json.dumps({"a": str(args.a), "b": str(args.b), "methods": out}, indent=1))


if __name__ == "__main__":
    main()
