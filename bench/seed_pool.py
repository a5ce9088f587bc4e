"""Bar verdicts over several trainings: pool `csrtool eval --per-position` runs of dictionaries trained with other seeds.

The intervals of `csrtool eval` resample positions of one dictionary set; another `train-dict --seed`
moves the Δppl of other-domain text more than they say (docs/quality.md, seventh and eighth
passes). Given the --json outputs of the same eval (same texts, tokens and baselines) with one
dictionary file per seed, this reports each CSR row's Δppl pooled over the seeds, with an interval
whose replicates draw the seeds as well as the positions (csrtool.eval.bootstrap.pooled_increase),
and the issue's bars on the pooled rows: at <= 1 bit the rise at most half of KIVI-2's, at
<= 2 bits within 2%. `csrtool eval --dicts D0 --dicts D1 ...` gives the same pooled rows in one
run; this script pools runs made apart (e.g. one per core, or on several machines).

    csrtool eval --dicts D0 --per-position --json s0.json ...   (then D1, D2 with the same flags)
    python bench/seed_pool.py s0.json s1.json s2.json --json pooled.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csrtool.eval.bootstrap import Resampler, verdict  # noqa: E402


def load(path: Path) -> dict:
    doc = json.loads(path.read_text())
    if "per_position" not in doc:
        sys.exit(f"{path}: no per-position block (run csrtool eval with --per-position)")
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="csrtool eval --per-position --json outputs, one per dictionary seed")
    ap.add_argument("--baseline", default="kivi2", help="the 1-bit bar's baseline row")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    docs = [load(p) for p in args.runs]
    pps = [d["per_position"] for d in docs]
    ref = pps[0]["reference_nll"]
    if any(p["reference_nll"] != ref or p["documents"] != pps[0]["documents"] for p in pps[1:]):
        sys.exit("the runs did not evaluate the same documents (their reference NLL differs)")
    r = Resampler([d["scored"] for d in pps[0]["documents"]])
    base = pps[0]["methods"][args.baseline]["nll"]
    bits = {row["name"]: row["bits_per_channel"] for row in docs[0]["methods"] if row.get("kind") == "CSR"}
    out = {"runs": [str(p) for p in args.runs], "baseline": args.baseline, "rows": {}}
    print(f"{len(docs)} runs, {r.n} positions; {args.baseline}: {r.ppl_increase(ref, base).point:+.2%}")
    for name, b in sorted(bits.items(), key=lambda kv: kv[1]):
        runs = [p["methods"][name]["nll"] for p in pps]
        each = [r.ppl_increase(ref, nll).point for nll in runs]
        pooled = r.pooled_increase(ref, runs)
        row = {"bits": b, "each": each, "pooled": pooled.as_dict()}
        line = f"{name} ({b:g} b/ch): each " + ", ".join(f"{e:+.2%}" for e in each) + f"; pooled {pooled.point:+.2%} [{pooled.lo:+.2%}, {pooled.hi:+.2%}]"
        if b <= 1.0 + 1e-9:
            ratio = r.pooled_ratio(ref, runs, base)
            row["ratio"], row["one_bit"] = ratio.as_dict(), verdict(ratio, 0.5)
            line += f"; ratio to {args.baseline} {ratio.point:.2f} [{ratio.lo:.2f}, {ratio.hi:.2f}]: {row['one_bit']} (<= 0.5)"
        if b <= 2.0 + 1e-9:
            row["two_bit"] = verdict(pooled, 0.02)
            line += f"; {row['two_bit']} (<= 2%)"
        out["rows"][name] = row
        print(line)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
