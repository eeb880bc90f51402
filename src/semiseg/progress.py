"""Progress of long loops (evaluate, predict, report, pseudo labelling, reading every mask of a folder).

On a terminal: a rich bar (``description ━━━ 120/1537 · 8.3 img/s · eta 0:02:51``). Not on a terminal (a log
file, CI), and for the data layer's phases (:func:`phase`): a plain line once the loop has run ``FIRST_LINE_S``
seconds, then every ``LOG_EVERY_S`` seconds, so a long job is never silent for minutes and a log does not fill
with redraws.

Whether progress is shown is a property of the *command and the terminal*, never of a run: the CLI sets it once
per command (:func:`configure`: ``--no-progress`` turns it off), and a loop deep in the data layer asks for it
with ``enabled=None``. Library callers that never configure it see nothing from such loops. Torch-free: the ONNX
deploy path uses it too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

ProgressFn = Callable[[int, int], None]
LOG_EVERY_S = 30.0
FIRST_LINE_S = 5.0  # "a few seconds": a phase shorter than this prints nothing off a terminal
_DISPLAY: dict[str, Any] = {"enabled": False, "console": None}


def configure(*, enabled: bool, console: Any = None) -> None:
    """The current command's display: whether loops asking with ``enabled=None`` show progress, and where."""
    _DISPLAY.update(enabled=enabled, console=console)


def _rate_text(done: int, seconds: float) -> str:
    return f"{done / seconds:.1f} img/s" if seconds > 0 and done else "- img/s"


def _eta_text(done: int, total: int, seconds: float) -> str:
    if not done or seconds <= 0:
        return "eta -"
    left = (total - done) * seconds / done
    return f"eta {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool | None = True, console: Any = None,
                 summary: bool = True, unit: str = "img", live: bool = True) -> Iterator[ProgressFn]:
    """Yield ``update(done, total)`` (the ``progress`` callback of :func:`evaluate_source` and friends).

    ``enabled=None``: as the command configured (:func:`configure`). ``summary``: with plain lines, a closing
    line even when the loop was short (otherwise only after a loop that already printed). ``live=False``: plain
    lines on a terminal too (a loop that may run inside another live display, which rich cannot nest)."""
    if enabled is None:
        enabled, console = _DISPLAY["enabled"], console or _DISPLAY["console"]
    if not enabled or total <= 0:
        yield lambda done, total: None
        return
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    t0 = time.perf_counter()
    if not (console.is_terminal and live):
        state = {"next": t0 + FIRST_LINE_S, "done": 0, "printed": False}

        def log_line(done: int, total_: int) -> None:
            state["done"] = done
            now = time.perf_counter()
            if now >= state["next"]:
                state.update(next=now + LOG_EVERY_S, printed=True)
                console.print(f"{description}: {done}/{total_} · {_rate_text(done, now - t0).replace('img', unit)} "
                              f"· {_eta_text(done, total_, now - t0)}", highlight=False, soft_wrap=True)

        yield log_line
        seconds = time.perf_counter() - t0
        if summary or state["printed"]:
            console.print(f"{description}: {state['done']}/{total} in {seconds:.1f}s · "
                          f"{_rate_text(state['done'], seconds).replace('img', unit)}", highlight=False,
                          soft_wrap=True)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TextColumn("eta"), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, rate=f"- {unit}/s")

        def update(done: int, total_: int) -> None:
            bar.update(task, completed=done, total=total_,
                       rate=_rate_text(done, time.perf_counter() - t0).replace("img", unit))

        yield update


def phase(description: str, total: int, unit: str = "file") -> contextlib.AbstractContextManager[ProgressFn]:
    """A step of the data layer that may take minutes on a big folder (reading every mask, say): shown as the
    command configured, in plain lines and only when it lasts (it may run while a training bar is live)."""
    return progress_bar(description, total, enabled=None, summary=False, unit=unit, live=False)
