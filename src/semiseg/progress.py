"""Progress of long inference loops (evaluate, predict, report, pseudo labelling): images/s and ETA.

On a terminal: a rich bar (``description ━━━ 120/1537 · 8.3 img/s · eta 0:02:51``). Not on a terminal (a log
file, CI): one plain line every ``LOG_EVERY_S`` seconds and one at the end, so a long job is never silent for
minutes and a log does not fill with redraws. Disabled entirely with ``enabled=False`` (``--no-progress``,
``train.progress: false``). Torch-free: the ONNX deploy path uses it too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

ProgressFn = Callable[[int, int], None]
LOG_EVERY_S = 30.0


def _rate_text(done: int, seconds: float) -> str:
    return f"{done / seconds:.1f} img/s" if seconds > 0 and done else "- img/s"


def _eta_text(done: int, total: int, seconds: float) -> str:
    if not done or seconds <= 0:
        return "eta -"
    left = (total - done) * seconds / done
    return f"eta {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True, console: Any = None) -> Iterator[ProgressFn]:
    """Yield ``update(done, total)`` (the ``progress`` callback of :func:`evaluate_source` and friends)."""
    if not enabled or total <= 0:
        yield lambda done, total: None
        return
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    t0 = time.perf_counter()
    if not console.is_terminal:
        state = {"last": t0, "done": 0}

        def log_line(done: int, total_: int) -> None:
            state["done"] = done
            now = time.perf_counter()
            if now - state["last"] >= LOG_EVERY_S:
                state["last"] = now
                console.print(f"{description}: {done}/{total_} · {_rate_text(done, now - t0)} · "
                              f"{_eta_text(done, total_, now - t0)}", highlight=False)

        yield log_line
        seconds = time.perf_counter() - t0
        console.print(f"{description}: {state['done']}/{total} in {seconds:.1f}s · "
                      f"{_rate_text(state['done'], seconds)}", highlight=False)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TextColumn("eta"), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="- img/s")

        def update(done: int, total_: int) -> None:
            bar.update(task, completed=done, total=total_,
                       rate=_rate_text(done, time.perf_counter() - t0))

        yield update
