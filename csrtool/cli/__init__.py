"""The `csrtool` command line: one small module per subcommand, no math here.

Each subcommand module registers itself on `app` when imported below. Commands
delegate to pipeline modules (`csrtool.collect`, `csrtool.train`, ...) and only
parse options, show progress and print results.
"""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from csrtool import __version__
from csrtool.cli.common import STATE, OneLineErrors, handle_sigterm

app = typer.Typer(
    name="csrtool",
    cls=OneLineErrors,
    help="Compress LLM KV caches ~16x with sparse codes over learned dictionaries (CSR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"csrtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail to stderr.")] = False,
) -> None:
    """Compress LLM KV caches ~16x with sparse codes over learned dictionaries (CSR).

    Typical chain: collect -> train-dict -> cache -> compress -> inspect -> eval.
    """
    STATE.debug = debug
    handle_sigterm()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


# Subcommands register themselves on import (order = order in --help).
from csrtool.cli import collect as _collect  # noqa: E402,F401
from csrtool.cli import train_dict as _train_dict  # noqa: E402,F401
from csrtool.cli import compress as _compress  # noqa: E402,F401
from csrtool.cli import eval as _eval  # noqa: E402,F401
from csrtool.cli import generate as _generate  # noqa: E402,F401


def main() -> None:
    app()
