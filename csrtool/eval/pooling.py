"""Results over several documents: pooled rows, per-document rows, intervals, the bar's verdicts.

Each method's pass over each document leaves per-position NLL and KL (runner).
Pooled perplexity is exp(Σ NLL / Σ positions) over all documents; its Δppl, KL
and (for CSR rows) ratio to KIVI-2's Δppl get a paired block bootstrap interval
(bootstrap.Resampler, blocks within documents). The bar's verdicts use those
intervals: "met" only when the whole interval clears the bar.

    Pool(doc_names, doc_lengths)            one per eval
    pool.add(name, doc_index, PassResult)   every (method, document) pass
    pool.intervals(block, seed, groups) -> {name: {"ppl_increase": .., "kl": .., "ratio_to_kivi2": ..}}
    pool.pooled_runs(names, ref)            one method trained several times (eval --dicts A --dicts B)
    bar(rows) -> dict                       the issue's bar with verdicts
"""

from __future__ import annotations

import math

import torch

from csrtool.eval import bootstrap

ONE_BIT_RATIO = 0.5  # CSR at <= 1 bit: at most half of KIVI-2's increase
TWO_BIT_LIMIT = 0.02  # CSR at <= 2 bits: within 2% of the baseline


class Pool:
    """Per-position NLL/KL of the reference and every method, document by document."""

    def __init__(self, doc_names: list[str]):
        self.doc_names = list(doc_names)
        self.nll: dict[str, list] = {}  # name -> [per document tensor [P_d] or None]
        self.kl: dict[str, list] = {}
        self.top1: dict[str, list] = {}

    def add(self, name: str, doc: int, nll_pos: torch.Tensor, kl_pos: torch.Tensor | None = None, top1: float = 1.0) -> None:
        n = len(self.doc_names)
        for store, value in ((self.nll, nll_pos), (self.kl, kl_pos), (self.top1, top1)):
            store.setdefault(name, [None] * n)[doc] = value

    def lengths(self, ref: str) -> list[int]:
        return [int(x.numel()) for x in self.nll[ref]]

    def flat(self, store: dict, name: str) -> torch.Tensor:
        return torch.cat([x.double().flatten() for x in store[name]])

    def pooled(self, name: str, ref: str) -> dict:
        """ppl, KL and top-1 over all documents (position-weighted)."""
        nll = self.flat(self.nll, name)
        n = nll.numel()
        lengths = self.lengths(ref)
        kl = self.flat(self.kl, name) if self.kl[name][0] is not None else torch.zeros(n, dtype=torch.float64)
        top1 = sum(t * m for t, m in zip(self.top1[name], lengths)) / max(1, n)
        return {"ppl": math.exp(float(nll.sum()) / max(1, n)), "kl": float(kl.sum()) / max(1, n), "top1_agreement": top1}

    def pooled_runs(self, names: list[str], ref: str) -> dict:
        """`pooled` of one method trained several times (one name per training): ppl = exp of the mean NLL over the
        runs and positions (its Δppl is the mean log increase, as bootstrap.pooled_increase); KL and top-1 the runs' means."""
        each = [self.pooled(n, ref) for n in names]
        return {"ppl": math.exp(sum(math.log(e["ppl"]) for e in each) / len(each)),
                "kl": sum(e["kl"] for e in each) / len(each), "top1_agreement": sum(e["top1_agreement"] for e in each) / len(each)}

    def per_document(self, name: str, ref: str, runs: list[str] | None = None) -> list[dict]:
        """Each document's ppl, Δppl and KL; with `runs`, those of the method `name` stands for, pooled as pooled_runs."""
        out = []
        for d, doc in enumerate(self.doc_names):
            rnll = self.nll[ref][d].double()
            n = max(1, rnll.numel())
            nlls = [self.nll[m][d].double() for m in runs or [name]]
            kls = [self.kl[m][d] for m in runs or [name]]
            mean_nll = sum(float(x.sum()) for x in nlls) / len(nlls) / n
            out.append({
                "document": doc,
                "ppl": math.exp(mean_nll),
                "ppl_increase": math.expm1(mean_nll - float(rnll.sum()) / n),
                "kl": sum(float(k.double().sum()) for k in kls) / len(kls) / n if kls[0] is not None else 0.0,
            })
        return out

    def intervals(self, ref: str, block: int = bootstrap.BLOCK, seed: int = 0, reps: int = bootstrap.REPS,
                  groups: dict[str, list[str]] | None = None) -> dict[str, dict]:
        """Bootstrap intervals of every method's pooled Δppl and KL, and of CSR rows' ratio to KIVI-2.

        `groups`: {name: [one method's rows, one per training]}; each name gets intervals whose replicates
        draw the trainings as well as the positions (bootstrap.pooled_increase)."""
        rs = bootstrap.Resampler(self.lengths(ref), block=block, reps=reps, seed=seed)
        r = self.flat(self.nll, ref)
        out = {}
        kivi2 = self.flat(self.nll, "kivi2") if "kivi2" in self.nll else None
        for name in self.nll:
            if name == ref:
                continue
            m = self.flat(self.nll, name)
            entry = {"ppl_increase": rs.ppl_increase(r, m).as_dict(), "kl": rs.mean(self.flat(self.kl, name)).as_dict()}
            if kivi2 is not None and name.startswith("csr"):
                entry["ratio_to_kivi2"] = rs.ratio(r, m, kivi2).as_dict()
            out[name] = entry
        for name, members in (groups or {}).items():
            runs = [self.flat(self.nll, m) for m in members]
            entry = {"ppl_increase": rs.pooled_increase(r, runs, seed + 1).as_dict(),
                     "kl": rs.pooled_mean([self.flat(self.kl, m) for m in members], seed + 1).as_dict()}
            if kivi2 is not None and name.startswith("csr"):
                entry["ratio_to_kivi2"] = rs.pooled_ratio(r, runs, kivi2, seed + 1).as_dict()
            out[name] = entry
        return out

    def per_position(self, ref: str) -> dict:
        """The JSON's per-position block: enough to recompute every number and interval."""
        return {
            "documents": [{"name": d, "scored": n} for d, n in zip(self.doc_names, self.lengths(ref))],
            "reference_nll": self.flat(self.nll, ref).tolist(),
            "methods": {
                name: {"nll": self.flat(self.nll, name).tolist(), "kl": self.flat(self.kl, name).tolist()}
                for name in self.nll if name != ref
            },
        }


def bar(rows: list[dict]) -> dict:
    """The issue's bar: CSR at <= 1 bit vs KIVI-2, CSR at <= 2 bits within 2% of the reference, with verdicts.

    Baseline: the fp16 row when run (the cache dtype a user starts from), else the reference.
    With several dictionary sets (rows carrying "run"), only the rows pooled over them compete: picking
    the best training would report its luck.
    The verdicts use the reference-based intervals; with fp16 as baseline the two differ by fp16's own
    (near-zero) rise, reported in `baseline_ppl`.
    """
    by_name = {r["name"]: r for r in rows}
    base = by_name.get("fp16") or rows[0]
    kivi2 = by_name.get("kivi2")
    out: dict = {"baseline_ppl": base["ppl"], "baseline": base["name"]}
    csr = [r for r in rows if r["kind"] == "CSR" and "run" not in r]  # with several trainings: their pooled rows
    for limit, key in ((1.0, "one_bit"), (2.0, "two_bit")):
        fits = [r for r in csr if r["bits_per_channel"] <= limit + 1e-9]
        if not fits:
            continue
        best = min(fits, key=lambda r: r["ppl"])
        inc = best["ppl"] / base["ppl"] - 1.0
        ci = best.get("ci", {})
        entry = {"method": best["name"], "bits_per_channel": best["bits_per_channel"], "ppl_increase": inc}
        if best.get("runs"):
            entry["runs"] = best["runs"]
        if "ppl_increase" in ci:
            entry["ppl_increase_ci"] = ci["ppl_increase"]
        if key == "one_bit" and kivi2 is not None:
            entry["kivi2_ppl_increase"] = kivi2["ppl"] / base["ppl"] - 1.0
            if "ppl_increase" in kivi2.get("ci", {}):
                entry["kivi2_ppl_increase_ci"] = kivi2["ci"]["ppl_increase"]
            entry["target"] = "at most half of KIVI-2's increase"
            entry["met"] = inc <= ONE_BIT_RATIO * entry["kivi2_ppl_increase"]
            if "ratio_to_kivi2" in ci:
                entry["ratio_to_kivi2_ci"] = ci["ratio_to_kivi2"]
                entry["verdict"] = bootstrap.verdict(ci["ratio_to_kivi2"], ONE_BIT_RATIO)
        if key == "two_bit":
            entry["target"] = "within 2% of the baseline"
            entry["met"] = inc <= TWO_BIT_LIMIT
            if "ppl_increase" in ci:
                entry["verdict"] = bootstrap.verdict(ci["ppl_increase"], TWO_BIT_LIMIT)
        out[key] = entry
    return out
