"""`csrtool generate`: text from a model whose KV cache is held as sparse codes (CSRCache)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from csrtool.cli import app
from csrtool.cli.common import AllowDownloadOpt, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelOpt, err, guarded, write_json
from csrtool.errors import CsrError


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


@app.command()
@guarded
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (or --prompt-file).")] = None,
    dicts: Annotated[Path, typer.Option("--dicts", "-d", help="Dictionary file from csrtool train-dict.")] = ...,
    model: ModelOpt = "smollm2-135m",
    bits: Annotated[float, typer.Option("--bits", "-b", help="Code bits per channel (K and V averaged), per-layer plan as compress --bits (with --resume: the file's).")] = 1.0,
    window: Annotated[Optional[int], typer.Option("--window", "-w", help="Most recent tokens kept uncompressed (default 4, as compress).")] = None,
    sink: Annotated[Optional[int], typer.Option("--sink", help="First tokens kept uncompressed (default 4).")] = None,
    block: Annotated[Optional[int], typer.Option("--block", help="Tokens coded per call while decoding (default 32): the uncompressed tail holds window..window+block-1 tokens.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 64,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the prompt from this UTF-8 file.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Sample (the model's generation config) instead of greedy decoding.")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue from a .csr file (csrtool compress of this model's cache with these dictionaries): the prompt follows its tokens.")] = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="Write the cache (prompt and new tokens) to this .csr file afterwards: --resume continues from it, csrtool inspect/decompress read it.")] = None,
    force: ForceOpt = False,
    reference: Annotated[bool, typer.Option("--reference", help="Attend by reconstructing the history (slow reference path) instead of on the codes.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_download: AllowDownloadOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Generate text with the KV cache held compressed in memory.

    Tokens older than the window are coded with the dictionaries as compress
    --bits --fixed --coef fp8 codes them (same per-layer plan and key space, S
    atoms per vector, fp8 coefficients); attention runs on the codes. The text streams to stdout; prefill and decode
    speed and the cache's bytes (next to an uncompressed cache's) go to stderr.
    --save writes the cache as a .csr file (its codes, not coded again) for --resume.
    """
    from csrtool import codec
    from csrtool import generate as gen
    from csrtool.cache import DEFAULT_BLOCK, CSRCache
    from csrtool.formats.dicts import load_dicts
    from csrtool.models import load_model

    if (prompt is None) == (prompt_file is None):
        raise CsrError("pass a prompt or --prompt-file (one of them)")
    if prompt_file is not None:
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CsrError(f"cannot read --prompt-file {prompt_file}: {exc}") from None
    if max_new_tokens < 1:
        raise CsrError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if save is not None:
        from csrtool.formats.io import check_output

        check_output(save, force=force)
    ds = load_dicts(dicts)
    loaded = load_model(model, device, dtype, allow_download)
    blk = DEFAULT_BLOCK if block is None else block
    if resume is not None:  # the file's plan, window and sink
        cache = CSRCache.from_csr(resume, ds, loaded.model, block=blk, reference=reference, tokenizer=loaded.tokenizer)
    else:
        cache = CSRCache.from_dicts(
            ds, loaded.model, bits=bits,
            window=codec.DEFAULT_WINDOW if window is None else window, sink=codec.DEFAULT_SINK if sink is None else sink,
            block=blk, reference=reference, tokenizer=loaded.tokenizer,
        )
    to_stdout = json_out is None or str(json_out) != "-"

    def show(text: str) -> None:
        if to_stdout:
            sys.stdout.write(text)
            sys.stdout.flush()

    with cache:
        result = gen.run(loaded.model, loaded.tokenizer, prompt, cache, max_new_tokens, show, do_sample=sample, keep_last=save is not None)
        saved = None
        if save is not None:
            saved = {"path": str(save), "bytes": cache.save(save, loaded.name), "tokens": cache.get_seq_length()}
    if to_stdout:
        sys.stdout.write("\n")
    held = result.cache_bytes
    err.print(
        f"prefill {result.prompt_tokens} tokens at {result.prefill_tps:.1f} tok/s, decode {result.new_tokens} tokens at {result.decode_tps:.1f} tok/s; "
        f"cache {_mb(held['total'])} (codes {_mb(held['codes'])}, uncompressed {_mb(held['dense'])}"
        + (f", token predictions {_mb(held['predictor'])}" if held.get("predictor") else "")
        + f"; dictionaries {_mb(held['dicts'])}) "
        f"vs {_mb(result.dynamic_bytes)} in a DynamicCache ({result.dynamic_bytes / max(1, held['total']):.1f}x smaller)",
        highlight=False,
    )
    if saved is not None:
        dyn = gen.dynamic_nbytes(loaded.model, saved["tokens"])
        err.print(f"saved {saved['tokens']} tokens to {save}: {_mb(saved['bytes'])} ({dyn / saved['bytes']:.1f}x smaller than a DynamicCache)", highlight=False)
    if json_out is not None:
        write_json(json_out, {**result.to_json(), "bits": bits, "model": model, "dicts": str(dicts), "plan": cache.setting.describe(), "saved": saved})
