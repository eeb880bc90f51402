"""A run's life once its directory exists: one process at a time (the run lock), its stages executed and its
results written, and a failure turned into one line that says how to go on (removing a fresh run that kept
nothing)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from semiseg.atomic import atomic_write_text, remove_stale_temporaries
from semiseg.engine.checkpoint import OUTPUT_ERRNOS, output_error
from semiseg.engine.distributed import barrier
from semiseg.errors import ConfigError, OutputError, RunInterrupted, SemisegError
from semiseg.layout import RunLayout
from semiseg.locks import exclusive, run_lock_path
from semiseg.methods.registry import get_method
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.preflight import check_output_folder
from semiseg.pipeline.results import final_results
from semiseg.pipeline.stages import run_stages


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One process trains a run at a time; a second one is refused with the holder's pid. Under torchrun the
    ranks of one launch are one job: rank 0 holds the lock for them. A run that never came to exist (refused
    input) leaves no lock file, and no ``out_dir`` when this call made it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    check_output_folder(run_dir.parent)  # its own words for an out_dir that is a file or read-only
    made_out_dir = not run_dir.parent.exists()
    if not made_out_dir:
        remove_stale_temporaries(run_dir.parent, recursive=False)  # run directories a SIGKILL left half made
    try:
        # keyed by the real path: a symlink to the run (or to out_dir) must meet the same lock
        with exclusive(run_lock_path(run_dir.resolve()), what=f"run {run_dir}", discard=lambda: not run_dir.exists()):
            yield
    finally:
        if made_out_dir:
            with contextlib.suppress(OSError):
                run_dir.parent.rmdir()  # only when empty


def guarded(run_dir: Path, work: Any, *, fresh: bool, batch_size: int) -> dict[str, Any]:
    """Run ``work()``; turn Ctrl-C, a full disk and other write failures into one-line errors that say how to
    go on. A fresh run that fails before its first checkpoint is removed, so the same name can be retried."""
    try:
        return work()
    except BaseException as err:
        kept = not fresh or RunLayout(run_dir).has_progress()
        if not kept:
            shutil.rmtree(run_dir, ignore_errors=True)
        last = RunLayout(run_dir).last_checkpoint() if kept else None
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        how = (f"`semiseg resume {run_dir}` continues ({where})" if kept
               else f"nothing was kept ({run_dir} removed): run the same command again")
        if isinstance(err, KeyboardInterrupt):
            raise RunInterrupted(f"interrupted: {how}") from None
        if isinstance(err, OSError) and err.errno in OUTPUT_ERRNOS:
            err = output_error(Path(err.filename) if err.filename else run_dir, err)
        if isinstance(err, OutputError):
            raise OutputError(f"{err}; after freeing space (or fixing the folder) {how}") from None
        if isinstance(err, SemisegError) and not kept:
            raise type(err)(f"{err} ({run_dir} removed: nothing had been trained yet)") from None
        if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err):
            raise ConfigError(f"out of memory while training ({str(err).splitlines()[0][:120]}): lower "
                              f"train.batch_size (now {batch_size}) or data.size; {how}") from None
        raise


def execute(ctx: RunContext, log: Any, wait_for_shared: bool = True) -> dict[str, Any]:
    """Run (or resume, or reuse) the method's stages, then evaluate the delivered model into ``results.json``."""
    t0 = time.time()
    method = get_method(ctx.config.method.name)(ctx, ctx.config.method)
    stage_dirs = run_stages(ctx.run_dir, method.stages(), out_dir=ctx.run_dir.resolve().parent, dist=ctx.dist,
                            log=log, wait_for_shared=wait_for_shared)
    results: dict[str, Any] = {}
    if ctx.dist.is_main:
        model = method.final_model()
        results = final_results(ctx, model, stage_dirs, time.time() - t0, trained_steps=method.trained_steps())
        atomic_write_text(RunLayout(ctx.run_dir).results, json.dumps(results, indent=1))
    barrier()
    return results
