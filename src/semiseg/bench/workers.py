"""``semiseg bench PROTOCOL --workers N``: N bench processes of one thread each share the matrix.

On a CPU box several one-thread processes use the cores better than one process with several threads. The
workers are the same bench command run N times side by side; the locks of :mod:`semiseg.locks` split the
work (a run is trained by one worker, a shared teacher once), so this module only starts them, prefixes
their output and combines their exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO


def worker_command(bench_args: list[str]) -> list[str]:
    """The command of one worker: this interpreter running the bench with one torch thread."""
    return [sys.executable, "-m", "semiseg", "bench", "run", *bench_args, "--set", "train.threads=1"]


def _relay(stream: IO[str], prefix: str, write: Callable[[str], None]) -> None:
    for line in stream:
        write(f"{prefix}{line.rstrip()}")


def run_workers(bench_args: list[str], workers: int, *, write: Callable[[str], None] = print) -> int:
    """Run ``workers`` bench processes side by side until all end; returns the first failing worker's exit
    status (1 for one killed by a signal), 0 when all finished. Ctrl-C reaches every worker (one process group),
    each stops resumably, and the parent waits for them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs, relays = [], []
    try:
        for i in range(workers):
            proc = subprocess.Popen(worker_command(bench_args), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            relay = threading.Thread(target=_relay, args=(proc.stdout, f"[worker {i + 1}] ", write), daemon=True)
            relay.start()
            procs.append(proc)
            relays.append(relay)
        codes = [proc.wait() for proc in procs]
    except BaseException:
        for proc in procs:  # Ctrl-C reached the workers too: let them stop on their own first
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()  # a checkpointed run resumes; nothing is recorded half
                proc.wait()
        raise
    finally:
        for relay in relays:
            relay.join(timeout=5)
    failed = [code for code in codes if code]
    return (failed[0] if failed[0] > 0 else 1) if failed else 0  # a negative code: killed by a signal
