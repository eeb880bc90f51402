"""The Python API behind the CLI: load a config, run, resume, evaluate, predict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from semiseg.config import RunConfig

# making or reopening a run directory, its life, and using a finished run live in their own modules; the API binds
from semiseg.finished import evaluate, load_run, predict  # noqa: F401
from semiseg.layout import RunLayout
from semiseg.lifecycle import execute, guarded, run_lock
from semiseg.pipeline.results import final_results, last_pseudo_label_quality  # noqa: F401
from semiseg.provenance import git_commit, portable_arg, recorded_command  # noqa: F401
from semiseg.rundir import config_from_dict, load_config, prepare, read_run_config  # noqa: F401


def run(config: RunConfig, *, console: Any = None, log: Any = print, wait_for_shared: bool = True) -> dict[str, Any]:
    """Train ``config``'s method from scratch in ``out_dir/name``; returns ``results.json``'s content.

    :class:`RunBusyError` when another process trains this run; a stage another process is computing is
    waited for, or with ``wait_for_shared=False`` raises :class:`StageBusyError` (the run stays resumable)."""
    run_dir = Path(config.out_dir) / config.name
    with run_lock(run_dir):
        return _train(config, run_dir, fresh=True, console=console, log=log, wait_for_shared=wait_for_shared)


def _train(config: RunConfig, run_dir: Path, *, fresh: bool, console: Any, log: Any, wait_for_shared: bool,
           accept_changed_data: bool = False) -> dict[str, Any]:
    """Prepare the run (fresh, or resumed and checked) and execute its stages; the caller holds its lock."""
    ctx = prepare(config, run_dir, console=console, fresh=fresh, accept_changed_data=accept_changed_data,
                  command="resume", log=log)
    return guarded(run_dir, lambda: execute(ctx, log, wait_for_shared), fresh=fresh,
                    batch_size=config.train.batch_size)


def resume(run_dir: Path, *, console: Any = None, log: Any = print, accept_changed_data: bool = False,
           wait_for_shared: bool = True) -> dict[str, Any]:
    """Continue a killed or unfinished run: finished stages are skipped, the current one resumes. A run whose
    config or data changed is refused (:mod:`semiseg.pipeline.integrity`)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    with run_lock(run_dir):
        return _train(config, run_dir, fresh=False, console=console, log=log, wait_for_shared=wait_for_shared,
                      accept_changed_data=accept_changed_data)


def finish(config: RunConfig, *, console: Any = None, log: Any = print,
           wait_for_shared: bool = True) -> tuple[dict[str, Any], bool]:
    """``config``'s run finished, whatever its state: read back when done, resumed when started, else trained.
    Returns ``(results, executed)``. The state is read under the run lock, so of two processes sharing an
    ``out_dir`` (``bench --workers``) the second one reads back what the first finished and never evaluates
    the run on test a second time."""
    run_dir = Path(config.out_dir) / config.name
    with run_lock(run_dir):
        layout = RunLayout(run_dir)
        if layout.results.is_file():
            return json.loads(layout.results.read_text()), False
        started = layout.config.is_file()
        return _train(read_run_config(run_dir) if started else config, run_dir, fresh=not started, console=console,
                      log=log, wait_for_shared=wait_for_shared), True


