"""Shared CLI pieces: error handling, common options, consoles, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console

from csrtool.errors import CsrError


@dataclass
class _State:
    debug: bool = False


STATE = _State()

# Results go to stdout, progress and messages to stderr.
# Piped output (logs, CI) gets a wide console so result tables are not squeezed to 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


def guarded(fn: Callable) -> Callable:
    """Turn CsrError (and Ctrl-C) into a one-line message on stderr and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CsrError as exc:
            if STATE.debug:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written under the output name", err=True)
            raise typer.Exit(130) from None

    return wrapper


def write_json(path: Optional[Path], data: dict) -> None:
    """Write a JSON report: '-' means stdout; sorted keys for stable output."""
    if path is None:
        return
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    from csrtool.formats.io import atomic_write_bytes

    atomic_write_bytes(path, (text + "\n").encode())


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model: built-in 'smollm2-135m' or 'gemma3-270m' (the gemma extra), a local folder or Hugging Face id, or a .gguf file.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, float16 or bfloat16.")]
AllowDownloadOpt = Annotated[
    bool, typer.Option("--allow-download", help="Let transformers download a Hugging Face model.")
]
TextOpt = Annotated[
    Optional[list[Path]],
    typer.Option("--text", "-t", help="UTF-8 text file (repeatable). Default: built-in corpus."),
]
LayersOpt = Annotated[
    Optional[str], typer.Option("--layers", help="Layers, e.g. '0-3,10,-1' (default: all).")
]
JsonOpt = Annotated[
    Optional[Path], typer.Option("--json", help="Also write the results as JSON to this path ('-' = stdout).")
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
