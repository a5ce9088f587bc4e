"""`csrtool eval`: CSR against the baselines a user would otherwise pick, in one run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from csrtool.cli import app
from csrtool.cli.common import AllowDownloadOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, err, guarded, out, write_json
from csrtool.errors import CsrError
from csrtool.eval.suite import EvalConfig

TABLE_WIDTH = 180  # the result table's width when stdout is a file or pipe
# Defaults sized so that `make demo` keeps its time budget (docs/quality.md §1): 2 documents of 1,024
# tokens, the baselines a user would pick (KIVI-2, PQ, transformers' quanto cache) and CSR with OMP.
# Every other row runs on request: --baselines fp16,kivi1,quanto4,... --methods mp,omp.
DEFAULT_BASELINES = "kivi2,pq,quanto2"
DEFAULT_SOLVERS = "omp"
DEFAULT_DOCS = 2


def _csv(value: str, what: str, cast=str) -> tuple:
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return tuple(cast(v) for v in items)
    except ValueError:
        raise CsrError(f"{what} {value!r}: give a comma-separated list, e.g. {'1,2' if cast is float else 'mp,omp'}") from None


def _is_partial(msg: str) -> bool:
    """A per-chunk progress line that is not the last of its pass ('name: 64/1024 tokens')."""
    m = re.search(r": (\d+)/(\d+) tokens$", msg)
    return m is not None and m.group(1) != m.group(2)


@app.command("eval")
@guarded
def eval_cmd(
    dicts: Annotated[Optional[list[Path]], typer.Option("--dicts", "-d", help="Dictionary file from csrtool train-dict (without it, only baselines run). Repeat it with the same setting trained with other seeds (train-dict --seed N): each CSR row is then given per training (name:d1, name:d2, ...) and pooled over them, with intervals that draw the training as well as the positions, and the bar judges the pooled rows: the verdict a user who trains once can expect.")] = None,
    model: ModelOpt = "smollm2-135m",
    text: Annotated[Optional[list[Path]], typer.Option("--text", "-t", help="UTF-8 text file, one document each (repeatable; its first --tokens tokens). Default: --docs windows of the built-in held-out corpus.")] = None,
    docs: Annotated[int, typer.Option("--docs", help="Documents of the built-in held-out corpus: consecutive non-overlapping windows of --tokens tokens, each fed from an empty cache; results per document and pooled, with bootstrap intervals.")] = DEFAULT_DOCS,
    bits: Annotated[str, typer.Option("--bits", help="CSR bit budgets per channel, comma-separated.")] = ",".join(f"{b:g}" for b in EvalConfig.bits),
    baselines: Annotated[str, typer.Option("--baselines", help="Comma-separated: fp16, kiviB (B in 1,2,3,4,8), pq (at each --bits) or pqB, quantoB (2,4), hqqB, fp8; '' for none.")] = DEFAULT_BASELINES,
    methods: Annotated[str, typer.Option("--methods", help="CSR solvers: mp, omp (mp,omp for both).")] = DEFAULT_SOLVERS,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens per document. Long-context mode: e.g. --tokens 4096 --chunk 512 --docs 1, where compressed history is most of what each prediction attends to.")] = EvalConfig.tokens,
    chunk: Annotated[int, typer.Option("--chunk", help="Tokens fed per forward pass.")] = EvalConfig.chunk,
    window: Annotated[int, typer.Option("--window", help="Most recent tokens kept in full precision.")] = EvalConfig.window,
    sink: Annotated[int, typer.Option("--sink", help="First tokens of the text kept in full precision by every method (attention sinks).")] = EvalConfig.sink,
    coef: Annotated[str, typer.Option("--coef", help="CSR coefficient format: fp8, fp16, int8, int4 or int3 for keys and values alike, or KEYS/VALUES such as fp8/int3 or fp16/fp8 (the default: fp8 keys; values as 4-bit integers with an fp8 scale per vector, which buy more atoms at the same bits, where a layer has at most an eighth of a chunk's channels in atoms, fp8 beyond).")] = EvalConfig.coef,
    uniform: Annotated[bool, typer.Option("--uniform", help="CSR: the same sparsity in every layer, even when the dictionaries carry train-dict's sensitivity calibration (as compress --uniform).")] = EvalConfig.uniform,
    codes: Annotated[str, typer.Option("--codes", help="CSR codes: 'fixed' (S atoms for every vector), 'adaptive' (each vector as many atoms as its fit needs, the same bits on average, counts paid for) or both, comma-separated.")] = ",".join(EvalConfig.codes),
    calib_tokens: Annotated[int, typer.Option("--calib-tokens", help="Calibration tokens for PQ codebooks (built-in calibration text).")] = EvalConfig.calib_tokens,
    needle: Annotated[bool, typer.Option("--needle/--no-needle", help="Run the passkey retrieval test.")] = EvalConfig.needle,
    needle_context: Annotated[int, typer.Option("--needle-context", help="Tokens of filler around the pass key.")] = EvalConfig.needle_context,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_download: AllowDownloadOpt = False,
    json_out: JsonOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: error per layer and quality vs bits.")] = None,
    per_position: Annotated[bool, typer.Option("--per-position", help="Put the per-position NLL of the reference and of each method (and KL) in the --json output, to recompute every interval.")] = False,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch (0: torch's default). Results are reproducible only at the same thread count (docs/quality.md).")] = 0,
) -> None:
    """Measure reconstruction, attention fidelity, perplexity/KL/top-1, passkey retrieval and memory
    of CSR and baselines on the same held-out tokens (built-in corpus unless --text).

    Defaults: 2 documents of 1,024 tokens, chunks of 64, fp16 window 32, sink 4; rows: reference,
    kivi2, pq at each --bits, quanto2, CSR (OMP) at 1 and 2 bits. Δppl and KL carry 95% paired block
    bootstrap intervals (blocks of 64 positions within documents); the bar says "met" only when the
    interval clears it, "not shown" when it straddles it."""
    import torch

    from csrtool.corpus import load_text, text_source
    from csrtool.eval.documents import file_documents, heldout_documents, token_ids
    from csrtool.formats.dicts import load_dicts
    from csrtool.eval import report
    from csrtool.eval.suite import run_eval
    from csrtool.formats.io import check_json_output, check_output
    from csrtool.models import load_model

    check_json_output(json_out)
    if plot is not None:
        check_output(plot, force=True)
    cfg = EvalConfig(
        bits=_csv(bits, "--bits", float), baselines=_csv(baselines, "--baselines"), solvers=_csv(methods, "--methods"),
        tokens=tokens, chunk=chunk, window=window, sink=sink, coef=coef, calib_tokens=calib_tokens,
        needle=needle, needle_context=needle_context, uniform=uniform, codes=_csv(codes, "--codes"),
    )
    if threads < 0:
        raise CsrError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model, device, dtype, allow_download)
    sets = [load_dicts(d, device=loaded.device) for d in dicts or []]
    if not sets:
        err.print("no --dicts: CSR rows skipped (train dictionaries with csrtool train-dict)")
    if len({ds.fingerprint for ds in sets}) < len(sets):
        raise CsrError("the same dictionary file was given twice to --dicts: pooling needs different trainings (train-dict --seed N)")
    documents = file_documents(loaded.tokenizer, text, tokens) if text else heldout_documents(loaded.tokenizer, docs, tokens)
    for d in documents:
        if d.tokens < tokens:
            err.print(f"{d.name} has only {d.tokens} tokens (asked for {tokens}): evaluating all of them")
    calib_ids = token_ids(loaded.tokenizer, load_text(None, "calibration"), calib_tokens) if calib_tokens else None
    names = [str(d) for d in dicts or []]
    meta = {"model": loaded.name, "text": text_source(text, "heldout"), "dicts": (names[0] if len(names) == 1 else names) or None,
            "device": str(loaded.device), "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    with err.status("evaluating") as status:

        def progress(msg: str) -> None:
            if err.is_terminal:
                status.update(msg)
            elif not _is_partial(msg):
                err.print(msg, highlight=False)

        predictors, shared = [None] * len(sets), {}
        for i, ds in enumerate(sets):
            if ds.predicted:  # the dictionaries code what the token predictor leaves; its K/V tables serve every set alike
                from csrtool.predictor import TokenPredictor

                like = TokenPredictor.setting(ds)
                if like not in shared:
                    shared[like] = TokenPredictor.for_dicts(loaded, ds)
                predictors[i] = shared[like]
        doc = run_eval(loaded.model, documents, cfg, sets or None, loaded.tokenizer if needle else None, calib_ids, progress=progress, meta=meta,
                       per_position=per_position, predictor=predictors)
    width = None if out.is_terminal else TABLE_WIDTH  # files/pipes: do not squash to 80 columns
    out.print(report.table(doc), width=width)
    per_doc = report.documents_table(doc)
    if per_doc is not None:
        out.print(per_doc, width=width)
    for line in report.lines(doc):
        out.print(line, highlight=False)
    write_json(json_out, report.json_safe(doc))
    if plot is not None:
        report.plot(doc, plot)
        err.print(f"wrote {plot}")
