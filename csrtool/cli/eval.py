"""`csrtool eval`: CSR against the baselines a user would otherwise pick, in one run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from csrtool.cli import app
from csrtool.cli.common import AllowDownloadOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, TextOpt, err, guarded, out, write_json
from csrtool.errors import CsrError
from csrtool.eval.suite import EvalConfig

CHARS_PER_TOKEN_MAX = 16  # tokenise only a prefix of the text long enough for the tokens asked
TABLE_WIDTH = 160  # the result table's width when stdout is a file or pipe


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


def _token_ids(tokenizer, text: str, n: int):
    """The first n tokens of text as [1, n] ids (tokenizing only a prefix long enough)."""
    from csrtool.collect import tokenize

    return tokenize(tokenizer, text[: n * CHARS_PER_TOKEN_MAX])[:n][None]


@app.command("eval")
@guarded
def eval_cmd(
    dicts: Annotated[Optional[Path], typer.Option("--dicts", "-d", help="Dictionary file from csrtool train-dict (without it, only baselines run).")] = None,
    model: ModelOpt = "smollm2-135m",
    text: TextOpt = None,
    bits: Annotated[str, typer.Option("--bits", help="CSR bit budgets per channel, comma-separated.")] = ",".join(f"{b:g}" for b in EvalConfig.bits),
    baselines: Annotated[str, typer.Option("--baselines", help="Comma-separated: fp16, kiviB, pq, quantoB, hqqB, fp8; '' for none.")] = ",".join(EvalConfig.baselines),
    methods: Annotated[str, typer.Option("--methods", help="CSR solvers: mp, omp.")] = ",".join(EvalConfig.solvers),
    tokens: Annotated[int, typer.Option("--tokens", help="Held-out tokens to evaluate.")] = EvalConfig.tokens,
    chunk: Annotated[int, typer.Option("--chunk", help="Tokens fed per forward pass.")] = EvalConfig.chunk,
    window: Annotated[int, typer.Option("--window", help="Most recent tokens kept in full precision.")] = EvalConfig.window,
    sink: Annotated[int, typer.Option("--sink", help="First tokens of the text kept in full precision by every method (attention sinks).")] = EvalConfig.sink,
    coef: Annotated[str, typer.Option("--coef", help="CSR coefficient format: fp8, fp16 or int8.")] = EvalConfig.coef,
    uniform: Annotated[bool, typer.Option("--uniform", help="CSR: the same sparsity in every layer, even when the dictionaries carry train-dict's sensitivity calibration (as compress --uniform).")] = EvalConfig.uniform,
    calib_tokens: Annotated[int, typer.Option("--calib-tokens", help="Calibration tokens for PQ codebooks (built-in calibration text).")] = EvalConfig.calib_tokens,
    needle: Annotated[bool, typer.Option("--needle/--no-needle", help="Run the passkey retrieval test.")] = EvalConfig.needle,
    needle_context: Annotated[int, typer.Option("--needle-context", help="Tokens of filler around the pass key.")] = EvalConfig.needle_context,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_download: AllowDownloadOpt = False,
    json_out: JsonOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: error per layer and quality vs bits.")] = None,
) -> None:
    """Measure reconstruction, attention fidelity, perplexity/KL/top-1, passkey retrieval and memory
    of CSR and baselines on the same held-out tokens (built-in corpus unless --text)."""
    from csrtool.corpus import load_text, text_source
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
        needle=needle, needle_context=needle_context, uniform=uniform,
    )
    body = load_text(text, "heldout")
    loaded = load_model(model, device, dtype, allow_download)
    ds = load_dicts(dicts, device=loaded.device) if dicts is not None else None
    if ds is None:
        err.print("no --dicts: CSR rows skipped (train dictionaries with csrtool train-dict)")
    ids = _token_ids(loaded.tokenizer, body, tokens)
    if ids.shape[1] < tokens:
        err.print(f"the text has only {ids.shape[1]} tokens (asked for {tokens}): evaluating all of them")
    calib_ids = _token_ids(loaded.tokenizer, load_text(None, "calibration"), calib_tokens) if calib_tokens else None
    meta = {"model": loaded.name, "text": text_source(text, "heldout"), "dicts": str(dicts) if dicts else None, "device": str(loaded.device)}
    with err.status("evaluating") as status:

        def progress(msg: str) -> None:
            if err.is_terminal:
                status.update(msg)
            elif not _is_partial(msg):
                err.print(msg, highlight=False)

        doc = run_eval(loaded.model, ids, cfg, ds, loaded.tokenizer if needle else None, calib_ids, progress=progress, meta=meta)
    out.print(report.table(doc), width=None if out.is_terminal else TABLE_WIDTH)  # files/pipes: do not squash to 80 columns
    for line in report.lines(doc):
        out.print(line, highlight=False)
    write_json(json_out, report.json_safe(doc))
    if plot is not None:
        report.plot(doc, plot)
        err.print(f"wrote {plot}")
