"""What every ``semiseg`` command shares: the consoles, one-line logging, progress display, option types."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from semiseg.errors import SemisegError


def _usage_error_class() -> type[Exception]:
    """The base class of the usage errors typer raises: typer >= 0.2x runs on a vendored click (typer._click) whose
    exceptions are not the click package's, and no longer depends on click at all."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException
    return ClickException


UsageError = _usage_error_class()

console = Console(stderr=True)
out = Console()


def log_line(message: str) -> None:
    """Progress and warnings on stderr, one unwrapped line each (paths stay whole, ``[...]`` stays text)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def display(no_progress: bool = False) -> None:
    """Progress of this command's long phases: on stderr unless --no-progress (plain lines when not a terminal)."""
    from semiseg.progress import configure

    configure(enabled=not no_progress, console=console)


SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key: a.b=c (repeatable)")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="no progress bar (also off when not a terminal)")]


def pair(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SemisegError(f"expected H,W (e.g. 256,256), got {value!r}")
    return int(parts[0]), int(parts[1])


def whole_numbers(value: str, option: str) -> list[int]:
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        raise SemisegError(f"{option} {value!r}: expected comma-separated whole numbers (e.g. 0,1,2)")
    return [int(p) for p in parts]


