"""The `dsq` command line. Every command turns a DsqError into one red line on stderr and exit code 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from dsq.errors import DsqError

app = typer.Typer(
    help="dsq: quantized DeepSeek-V2 / V2-Lite inference (FP8 W8A8 + INT4 experts).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable)


def command(fn: F) -> F:
    """Register a command whose bad input ends in one line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DsqError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            sys.exit(130)

    return app.command()(wrapper)


def main() -> None:
    app()
