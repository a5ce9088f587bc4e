"""Shared CLI pieces: error handling, common options, consoles, JSON output."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

try:  # typer >= 0.24 vendors click as typer._click; older typer uses click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError

from csrtool.errors import CsrError


@dataclass
class _State:
    debug: bool = False


STATE = _State()

# Results go to stdout, progress and messages to stderr.
# Piped output (logs, CI) gets a wide console so result tables are not squeezed to 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs (temporaries removed, nothing half-written)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Treat SIGTERM like SIGINT (only possible from the main thread)."""
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, _on_sigterm)


class OneLineErrors(TyperGroup):
    """Usage errors (`--bits abc`, an unknown option) as one line on stderr, exit 2 (click's usage code),
    instead of the usage box; user errors in the commands themselves exit 1 (see `guarded`)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        with self._one_line(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        with self._one_line(ctx):
            return super().invoke(ctx)

    @staticmethod
    @contextlib.contextmanager
    def _one_line(ctx: typer.Context) -> Any:
        try:
            yield
        except UsageError as exc:
            if isinstance(exc, NoArgsIsHelpError):
                raise
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            typer.echo(f"error: {exc.format_message()} (see {where} --help)", err=True)
            raise typer.Exit(2) from None


def guarded(fn: Callable) -> Callable:
    """Turn CsrError (and Ctrl-C, SIGTERM) into a one-line message on stderr and exit 1 (130, 143)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CsrError as exc:
            if STATE.debug:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            what = "terminated" if isinstance(exc, Terminated) else "interrupted"
            typer.echo(f"{what}: nothing was written under the output name", err=True)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None

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
