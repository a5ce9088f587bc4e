"""One evaluation run: build the methods from options, run them on the same tokens, collect results.

    EvalConfig(...)                                   frozen, validated
    build_methods(cfg, ...) -> (methods, skipped)     skipped = [(name, reason)]
    run_eval(model, ids, cfg, dicts, ...) -> dict     the JSON document report.py renders

Cost: one reference pass, one chunked pass per method (each a full forward over
the tokens), PQ calibration (one forward over `calib_tokens`), and the needle
(one prefill of ~`needle_context` tokens per depth per method, reference included).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from csrtool import codec
from csrtool.errors import CsrError
from csrtool.eval import bootstrap, kivi, metrics, needle, pooling, pq, quanto, runner
from csrtool.eval.csr import CSR
from csrtool.eval.documents import Document
from csrtool.eval.methods import FP16_BITS, CastMethod, bits_per_channel
from csrtool.reconstruct import CHUNK, SINK, WINDOW

DEFAULT_BASELINES = ("fp16", "kivi2", "kivi1", "pq", "quanto2", "quanto4")
BASELINE_HELP = "fp16, kiviB (B in 1,2,3,4,8), pq (at each --bits) or pqB, quantoB (2,4), hqqB (1,2,3,4,8), fp8 (transformers QuantizedCache)"


CODES = ("fixed", "adaptive")
DEFAULT_CODE = "adaptive" if codec.ADAPTIVE_DEFAULT else "fixed"  # compress's default; its rows are named plainly (csr-omp-1b)


@dataclass(frozen=True)
class EvalConfig:
    bits: tuple[float, ...] = (1.0, 2.0)
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    solvers: tuple[str, ...] = ("mp", "omp")
    tokens: int = 1024
    chunk: int = CHUNK
    window: int = WINDOW
    sink: int = SINK  # first tokens kept in full precision for every method (attention sinks; docs/quality.md)
    coef: str = codec.DEFAULT_COEF
    kivi_group: int = 32
    calib_tokens: int = 1024
    needle: bool = True
    needle_context: int = 256
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    seed: int = 0
    uniform: bool = False  # CSR: same sparsity in every layer even with calibrated dictionaries
    codes: tuple[str, ...] = (DEFAULT_CODE,)  # CSR rows: 'fixed' S atoms per vector and/or 'adaptive' counts (same bits)

    def __post_init__(self) -> None:
        for b in self.bits:
            if not b > 0:
                raise CsrError(f"--bits values must be positive, got {b}")
        for s in self.solvers:
            if s not in ("mp", "omp"):
                raise CsrError(f"--methods takes mp and/or omp, got {s!r}")
        for name, v, lo in (("--tokens", self.tokens, 2), ("--chunk", self.chunk, 1), ("--window", self.window, 0), ("--sink", self.sink, 0), ("calib_tokens", self.calib_tokens, 0), ("kivi group", self.kivi_group, 1)):
            if not isinstance(v, int) or v < lo:
                raise CsrError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.tokens < self.chunk + 2:
            raise CsrError(f"--tokens {self.tokens} must exceed --chunk {self.chunk} by at least 2 (predictions after the first chunk are scored)")
        for b in self.baselines:
            parse_baseline(b)
        for c in self.codes:
            if c not in CODES:
                raise CsrError(f"--codes takes {' and/or '.join(CODES)}, got {c!r}")
        if not self.codes:
            raise CsrError(f"--codes needs at least one of {', '.join(CODES)}")
        for d in self.needle_depths:
            if not 0.0 <= d <= 1.0:
                raise CsrError(f"needle depths must lie in [0, 1], got {d}")


def parse_baseline(spec: str) -> tuple[str, int | None]:
    """'kivi2' -> ('kivi', 2); 'pq' -> ('pq', None); unknown -> CsrError naming the valid ones."""
    m = re.fullmatch(r"(fp16|fp8|kivi|pq|quanto|hqq)(\d*)", spec.strip().lower())
    ok = m is not None
    if ok:
        kind, num = m.group(1), (int(m.group(2)) if m.group(2) else None)
        allowed = {"kivi": {1, 2, 3, 4, 8}, "quanto": {2, 4}, "hqq": {1, 2, 3, 4, 8}, "pq": None, "fp16": {None}, "fp8": {None}}[kind]
        ok = allowed is None or num in allowed
    if not ok:
        raise CsrError(f"unknown baseline {spec!r}: use {BASELINE_HELP}")
    return kind, num


def build_methods(cfg: EvalConfig, model, dicts=None, calib: Callable[[], dict] | None = None, predictor=None) -> tuple[list, list[tuple[str, str]]]:
    """Methods to run, in table order, and the (name, reason) of those skipped."""
    from csrtool.models import kv_shape, rope_info

    n_layers, heads, head_dim = kv_shape(model.config)
    dtype = next(model.parameters()).dtype
    methods, skipped = [], []
    calib_cache: dict = {}

    def calibration() -> dict | None:
        if "x" not in calib_cache:
            calib_cache["x"] = calib() if calib is not None else None
        return calib_cache["x"]

    for spec in cfg.baselines:
        kind, num = parse_baseline(spec)
        if kind == "fp16":
            if dtype == torch.float16:
                skipped.append(("fp16", "the model runs in fp16: the reference row is fp16"))
            else:
                methods.append(CastMethod(torch.float16, "fp16"))
        elif kind == "kivi":
            methods.append(kivi.KIVI(num, group=cfg.kivi_group))
        elif kind == "pq":
            for b in ([num] if num is not None else cfg.bits):
                name = f"pq{b:g}"
                if not pq.faiss_available():
                    skipped.append((name, "needs faiss: pip install faiss-cpu"))
                    continue
                try:
                    pq.subquantizers(b, head_dim)
                except CsrError as exc:
                    skipped.append((name, str(exc)))
                    continue
                data = calibration()
                if not data:
                    skipped.append((name, "no calibration activations (calib_tokens = 0 or no calibration text)"))
                    continue
                try:
                    methods.append(pq.ProductQuantizer(data, b, seed=1234 + cfg.seed, name=name))
                except CsrError as exc:
                    skipped.append((name, str(exc)))
        else:  # transformers QuantizedCache
            backend = "fp8" if kind == "fp8" else kind
            name = f"{kind}{num}" if num is not None else "tf-fp8"
            missing = quanto.backend_missing(backend) or quanto.unsupported_model(model, backend)
            if missing:
                skipped.append((name, missing))
                continue
            methods.append(quanto.QuantizedCacheMethod(backend, num or 8, cfg.window, dtype_bits=quanto.dtype_bits(dtype), name=name))
    sets = dict_sets(dicts)
    predictors = list(predictor) if isinstance(predictor, (list, tuple)) else [predictor] * len(sets)
    if len(predictors) != len(sets):
        raise CsrError(f"{len(sets)} dictionary sets but {len(predictors)} token predictors")
    if sets:
        rope = rope_info(model)
        for b in cfg.bits:
            for solver in cfg.solvers:
                for mode in cfg.codes:
                    name = None if mode == DEFAULT_CODE else f"csr-{solver}-{b:g}b-{mode}"
                    for i, (ds, pred) in enumerate(zip(sets, predictors)):
                        m = CSR(ds, n_layers, heads, head_dim, bits=b, method=solver, coef=cfg.coef, rope_info=rope,
                                uniform=cfg.uniform, adaptive=mode == "adaptive", name=name, predictor=pred)
                        if len(sets) > 1:  # one row per training, then the row pooled over them (run_eval)
                            m.group, m.run = m.name, i + 1
                            m.name = run_name(m.name, i + 1)
                        methods.append(m)
    return methods, skipped


def dict_sets(dicts) -> list:
    """None, one DictSet, or several (eval --dicts A --dicts B: the same setting trained with other seeds) -> a list."""
    if dicts is None:
        return []
    return list(dicts) if isinstance(dicts, (list, tuple)) else [dicts]


def run_name(name: str, run: int) -> str:
    """The row of one training among several: 'csr-omp-1b' -> 'csr-omp-1b:d2' (the second --dicts)."""
    return f"{name}:d{run}"


MEMORY_KEYS = ("bits_per_channel", "bits_k", "bits_v", "bits_with_window", "bits_total", "side_bits", "ratio_vs_fp16", "ratio_total_vs_fp16")  # memory()'s
SUMMARY_KEYS = ("rel_err_k", "rel_err_v", "cos_k", "cos_v", "attn_err")  # summarize()'s means over layers


def memory(method, tokens: int, window: int, n_layers: int, heads: int, head_dim: int, sink: int = 0) -> dict:
    """Bits per channel: payload, with the fp16 window and sink tokens, and with side data amortised over `tokens`."""
    payload = bits_per_channel(method)
    w = min(window + sink, tokens)
    with_window = ((tokens - w) * payload + w * FP16_BITS) / tokens
    channels = tokens * n_layers * heads * 2 * head_dim
    total = with_window + method.side_bits / channels
    return {
        "bits_per_channel": payload,
        "bits_k": float(method.bits_k),
        "bits_v": float(method.bits_v),
        "bits_with_window": with_window,
        "bits_total": total,
        "side_bits": int(method.side_bits),
        "ratio_vs_fp16": FP16_BITS / payload if payload else None,
        "ratio_total_vs_fp16": FP16_BITS / total if total else None,
    }


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(result: runner.PassResult, n_layers: int) -> tuple[dict, list[dict]]:
    """Table numbers (means over layers) and per-layer detail of one pass."""
    layers = []
    for layer in range(n_layers):
        row = {"layer": layer}
        for kind in ("k", "v"):
            st = result.recon.get((layer, kind))
            row[f"rel_err_{kind}"] = st.rel_err if st else None
            row[f"cos_{kind}"] = st.cos if st else None
            row[f"sqnr_db_{kind}"] = st.sqnr_db if st else None
            row[f"heads_{kind}"] = st.per_head() if st else None
        at = result.attn.get(layer)
        row["attn_err"] = at.value if at else None
        layers.append(row)
    return {key: _mean([r[key] for r in layers]) for key in SUMMARY_KEYS}, layers


def run_eval(
    model,
    ids,
    cfg: EvalConfig,
    dicts=None,
    tokenizer=None,
    calib_ids: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
    meta: dict | None = None,
    per_position: bool = False,
    block: int = bootstrap.BLOCK,
    predictor=None,
) -> dict:
    """Run the reference and every method on each document; return the result document.

    `predictor`: the model's csrtool.predictor.TokenPredictor, needed by dictionaries trained with it.
    `dicts` may be a list: the same setting trained several times (seeds). Each CSR setting then has a row
    per training (`run`: 1, 2, ...) and a row pooled over them whose intervals draw the trainings too;
    the bar judges the pooled rows. `predictor` is then one per set (or one for all).

    `ids` is one text [1, T] or a list of documents.Document, each fed from an empty cache.
    Rows are pooled over the documents (with bootstrap intervals); `documents` has each one's rows.
    """
    from csrtool.models import kv_shape

    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    n_layers, heads, head_dim = kv_shape(model.config)
    docs = [Document("text", ids)] if isinstance(ids, torch.Tensor) else list(ids)
    if not docs:
        raise CsrError("no documents to evaluate")
    docs = [Document(d.name, d.ids.to(model.device)) for d in docs]
    for d in docs:
        runner.check_inputs(d.ids, cfg.chunk, cfg.window, cfg.sink)
    tokens = max(d.tokens for d in docs)
    multi = len(docs) > 1

    def calib():
        if calib_ids is None or cfg.calib_tokens == 0:
            return None
        say(f"calibration: collecting keys and values of {min(cfg.calib_tokens, calib_ids.shape[1])} tokens for PQ")
        return runner.collect_kv(model, calib_ids[:, : cfg.calib_tokens].to(model.device))

    methods, skipped = build_methods(cfg, model, dicts, calib, predictor)
    for name, reason in skipped:
        say(f"skipped {name}: {reason}")

    pool = pooling.Pool([d.name for d in docs])
    dtype = next(model.parameters()).dtype
    ref_bits = float(torch.finfo(dtype).bits)
    ref_name = f"reference ({str(dtype).removeprefix('torch.')})"
    refs, ref_seconds = [], 0.0
    for i, d in enumerate(docs):
        prefix = f"doc {i + 1}/{len(docs)} " if multi else ""
        ref = runner.reference_pass(model, d.ids, cfg.chunk, progress=(lambda m, p=prefix: say(p + m)))
        refs.append(ref)
        ref_seconds += ref.seconds
        pool.add(ref_name, i, ref.nll_pos)
    rows = [{
        "name": ref_name,
        "kind": "reference",
        "bits_per_channel": ref_bits, "bits_k": ref_bits, "bits_v": ref_bits,
        "bits_with_window": ref_bits, "bits_total": ref_bits, "side_bits": 0,
        "ratio_vs_fp16": FP16_BITS / ref_bits, "ratio_total_vs_fp16": FP16_BITS / ref_bits,
        **pool.pooled(ref_name, ref_name), "kl": 0.0, "top1_agreement": 1.0,
        "rel_err_k": 0.0, "rel_err_v": 0.0, "cos_k": 1.0, "cos_v": 1.0, "attn_err": 0.0,
        "seconds": ref_seconds, "layers": [],
    }]

    trials = []
    if cfg.needle and tokenizer is not None:
        trials = needle.make_trials(tokenizer, cfg.needle_context, cfg.needle_depths, seed=cfg.seed)
        from csrtool.eval.methods import Identity

        say("needle: reference")
        rows[0]["needle"] = needle.accuracy(model, tokenizer, trials, Identity(), cfg.chunk, tokens)

    groups: dict[str, list[str]] = {}  # pooled row -> its rows, one per training (several --dicts)
    n_sets = len(dict_sets(dicts))
    for method in methods:
        merged = runner.PassResult(method.name, 0.0, 0.0, 0.0, 0)
        for i, (d, ref) in enumerate(zip(docs, refs)):
            prefix = f"doc {i + 1}/{len(docs)} " if multi else ""
            res = runner.method_pass(model, d.ids, method, ref, cfg.chunk, cfg.window, progress=(lambda m, p=prefix: say(p + m)), sink=cfg.sink)
            pool.add(method.name, i, res.nll_pos, res.kl_pos, res.top1)
            _merge(merged, res)
        summary, layers = summarize(merged, n_layers)
        pooled = pool.pooled(method.name, ref_name)
        row = {
            "name": method.name,
            "kind": type(method).__name__,
            **memory(method, tokens, cfg.window, n_layers, heads, head_dim, cfg.sink),
            **pooled,
            **summary,
            "seconds": merged.seconds,
            "layers": layers,
        }
        if hasattr(method, "describe"):
            row["config"] = method.describe()
        if trials:
            say(f"needle: {method.name}")
            row["needle"] = needle.accuracy(model, tokenizer, trials, method, cfg.chunk, cfg.window, cfg.sink)
        rows.append(row)
        say(f"{method.name}: ppl {pooled['ppl']:.3f} (reference {rows[0]['ppl']:.3f}), KL {pooled['kl']:.4f}, {merged.seconds:.0f} s")
        if getattr(method, "run", None) is not None:
            row["run"] = method.run
            groups.setdefault(method.group, []).append(method.name)
            if method.run == n_sets:
                rows.append(pooled_row(method.group, [r for r in rows if r["name"] in groups[method.group]], pool.pooled_runs(groups[method.group], ref_name)))

    ref_ppl = rows[0]["ppl"]
    intervals = pool.intervals(ref_name, block=block, seed=cfg.seed, groups=groups)
    for row in rows:
        row["ppl_increase"] = row["ppl"] / ref_ppl - 1.0
        if row["name"] in intervals:
            row["ci"] = intervals[row["name"]]
    doc = {
        "config": {
            **(meta or {}),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "tokens": tokens,
            "documents": len(docs),
            "scored_predictions": sum(pool.lengths(ref_name)),
            "bootstrap": {"block": block, "replicates": bootstrap.REPS, "level": bootstrap.LEVEL, "seed": cfg.seed},
            "num_layers": n_layers, "num_kv_heads": heads, "head_dim": head_dim,
            "dicts_fingerprint": _each(dicts, "fingerprint"),
            "dicts_source": _each(dicts, "source"),
        },
        "reference_ppl": ref_ppl,
        "methods": rows,
        "documents": [
            {"name": d.name, "tokens": d.tokens, "scored": n, "reference_ppl": math.exp(float(r.nll_pos.sum()) / max(1, n)),
             "methods": {row["name"]: pool.per_document(row["name"], ref_name, groups.get(row["name"]))[i] for row in rows[1:]}}
            for i, (d, r, n) in enumerate(zip(docs, refs, pool.lengths(ref_name)))
        ],
        "skipped": [{"name": n, "reason": r} for n, r in skipped],
        "bar": bar(rows),
        "seconds": time.perf_counter() - t_start,
    }
    if per_position:
        doc["per_position"] = pool.per_position(ref_name)
    return doc


def pooled_row(name: str, members: list[dict], pooled: dict) -> dict:
    """The row of one CSR setting over several trainings: Δppl, KL and top-1 pooled (Pool.pooled_runs), errors the
    runs' means, and the memory of the costliest run (each run is a dictionary set a user could have)."""
    costliest = max(members, key=lambda r: (r["bits_per_channel"], r["bits_total"]))
    row = {"name": name, "kind": "CSR", "runs": len(members), **{k: costliest[k] for k in MEMORY_KEYS}, **pooled}
    for key in SUMMARY_KEYS:
        row[key] = _mean([r.get(key) for r in members])
    row["seconds"] = sum(r["seconds"] for r in members)
    row["layers"] = []
    if "config" in costliest:
        row["config"] = costliest["config"]
    return row


def _each(dicts, attr: str):
    """A dictionary-set attribute for the JSON: one value, a list with several sets, None without."""
    vals = [getattr(d, attr, None) for d in dict_sets(dicts)]
    return vals[0] if len(vals) == 1 else (vals or None)


def _merge(into: runner.PassResult, res: runner.PassResult) -> None:
    """Add one document's pass to the running totals of a method (reconstruction and attention sums)."""
    for key, st in res.recon.items():
        into.recon.setdefault(key, metrics.ErrorStats()).merge(st)
    for key, st in res.attn.items():
        into.attn.setdefault(key, metrics.RatioStats()).merge(st)
    into.seconds += res.seconds


bar = pooling.bar  # the bar with interval verdicts (kept here for callers of suite.bar)
