"""The Python API behind the CLI: load a config, run, resume, evaluate, predict."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from semiseg.atomic import atomic_write_text, remove_stale_temporaries
from semiseg.config import RunConfig
from semiseg.engine.checkpoint import OUTPUT_ERRNOS, output_error
from semiseg.engine.distributed import barrier
from semiseg.errors import ConfigError, OutputError, RunInterrupted, SemisegError

# making or reopening a run directory, and using a finished run, live in their own modules; the API offers them
from semiseg.finished import evaluate, load_run, predict  # noqa: F401
from semiseg.layout import RunLayout, StageLayout
from semiseg.locks import exclusive, run_lock_path
from semiseg.methods.registry import get_method
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.preflight import check_output_folder, void_stems, void_warning
from semiseg.pipeline.stages import run_stages
from semiseg.rundir import config_from_dict, load_config, prepare, read_run_config  # noqa: F401


def git_commit() -> str | None:
    """Short commit of the code that runs, ``-dirty`` when the package's own files have uncommitted changes
    (result files a bench rewrites do not count)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if changed else "") if head else None


def portable_arg(token: str, cwd: Path | None = None) -> str:
    """A command-line token with no path of this machine: an absolute path (alone, or as the value of
    ``key=path``) becomes relative to ``cwd`` (default: the working directory) when it lies inside it, else its
    last component."""
    key, sep, value = token.rpartition("=") if "=" in token else ("", "", token)
    if not value.startswith("/"):
        return token
    path, cwd = Path(value), cwd or Path.cwd()
    short = str(path.relative_to(cwd)) if path.is_relative_to(cwd) and path != cwd else path.name or "/"
    return f"{key}{sep}{short}"


def recorded_command(argv: list[str] | None = None) -> str:
    """The command line as results record it, every token through :func:`portable_arg` (an absolute
    ``--out-dir`` elsewhere becomes ``--out-dir bench-runs``)."""
    return " ".join(["semiseg", *map(portable_arg, sys.argv[1:] if argv is None else argv)])


def _guarded(run_dir: Path, work: Any, *, fresh: bool, batch_size: int) -> dict[str, Any]:
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


def _execute(ctx: RunContext, log: Any, wait_for_shared: bool = True) -> dict[str, Any]:
    t0 = time.time()
    method = get_method(ctx.config.method.name)(ctx, ctx.config.method)
    stage_dirs = run_stages(ctx.run_dir, method.stages(), out_dir=ctx.run_dir.resolve().parent, dist=ctx.dist,
                            log=log, wait_for_shared=wait_for_shared)
    results: dict[str, Any] = {}
    if ctx.dist.is_main:
        model = method.final_model()
        results = final_results(ctx, model, stage_dirs, time.time() - t0, trained_steps=method.trained_steps())
        atomic_write_text(ctx.run_dir / "results.json", json.dumps(results, indent=1))
    barrier()
    return results


def final_results(ctx: RunContext, model: torch.nn.Module, stage_dirs: list[Path], seconds: float, *,
                  trained_steps: int | None = None) -> dict:
    """Val metrics at working size, test metrics at original resolution, timings, provenance, and the
    optimizer steps behind the delivered net (``trained_steps``: which supervised run is its compute-matched
    control)."""
    from semiseg.evaluation.evaluator import evaluate_source
    from semiseg.pipeline.training import barely_moved_warning, moved_from_init, validation_fn

    cfg = ctx.config
    val = validation_fn(ctx)(model)
    moved = moved_from_init(ctx, model)
    test = None
    if ctx.test_stems:
        res = evaluate_source(model, ctx.source, ctx.test_stems, protocol=cfg.eval.protocol,
                              size=tuple(cfg.data.size), window=cfg.eval.window, stride=cfg.eval.stride,
                              device=ctx.device)
        test = res.to_dict()
        test["headline"] = res.headline()
    void = {"val": void_stems(ctx.arrays("val")) if ctx.splits.val else [], "test": (test or {}).get("void_images", [])}
    warnings = [w for w in [barely_moved_warning(moved), *(void_warning(k, v) for k, v in void.items())] if w]
    stages = []
    for d in stage_dirs:
        stage = StageLayout(d)
        info = json.loads(stage.done.read_text()) if stage.is_done() else {}
        stages.append({"dir": d.name, **info})
    diagnostics = ctx.run_dir / "diagnostics.json"
    return {
        "pseudo_label_quality": last_pseudo_label_quality(stage_dirs, ctx.classes.is_binary),
        "diagnostics": json.loads(diagnostics.read_text()) if diagnostics.is_file() else None,
        "name": cfg.name, "method": cfg.method.name, "split_seed": cfg.split.seed, "seed": cfg.seed,
        # what makes a variant (e.g. supervised with a Dice loss is no compute-matched control)
        "method_options": cfg.method.model_dump(mode="json", exclude_defaults=True),
        "val_metric": ctx.val_metric, "val": val, "test": test, "moved_from_init": moved, "warnings": warnings,
        "void_images": void,  # masks void everywhere: no score, left out of every mean
        "trained_steps": trained_steps,
        "stage_seconds": round(sum(s.get("seconds", 0.0) for s in stages), 1),
        "session_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stages": stages, "command": recorded_command(), "commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),  # UTC: result files merge by it
    }


def last_pseudo_label_quality(stage_dirs: list[Path], binary: bool) -> float | None:
    """Quality of the newest pseudo-label round against ground truth (benchmark mode), if any."""
    for d in reversed(stage_dirs):
        for stats_path in sorted(d.rglob("stats.json")):
            quality = json.loads(stats_path.read_text()).get("quality")
            if quality:
                return quality.get("foreground_dice" if binary else "miou")
    return None


def run(config: RunConfig, *, console: Any = None, log: Any = print, wait_for_shared: bool = True) -> dict[str, Any]:
    """Train ``config``'s method from scratch in ``out_dir/name``; returns ``results.json``'s content.

    :class:`RunBusyError` when another process trains this run; a stage another process is computing is
    waited for, or with ``wait_for_shared=False`` raises :class:`StageBusyError` (the run stays resumable)."""
    run_dir = Path(config.out_dir) / config.name
    with _run_lock(run_dir):
        return _train(config, run_dir, fresh=True, console=console, log=log, wait_for_shared=wait_for_shared)


def _train(config: RunConfig, run_dir: Path, *, fresh: bool, console: Any, log: Any, wait_for_shared: bool,
           accept_changed_data: bool = False) -> dict[str, Any]:
    """Prepare the run (fresh, or resumed and checked) and execute its stages; the caller holds its lock."""
    ctx = prepare(config, run_dir, console=console, fresh=fresh, accept_changed_data=accept_changed_data,
                  command="resume", log=log)
    return _guarded(run_dir, lambda: _execute(ctx, log, wait_for_shared), fresh=fresh,
                    batch_size=config.train.batch_size)


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
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


def resume(run_dir: Path, *, console: Any = None, log: Any = print, accept_changed_data: bool = False,
           wait_for_shared: bool = True) -> dict[str, Any]:
    """Continue a killed or unfinished run: finished stages are skipped, the current one resumes. A run whose
    config or data changed is refused (:mod:`semiseg.pipeline.integrity`)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    with _run_lock(run_dir):
        return _train(config, run_dir, fresh=False, console=console, log=log, wait_for_shared=wait_for_shared,
                      accept_changed_data=accept_changed_data)


def finish(config: RunConfig, *, console: Any = None, log: Any = print,
           wait_for_shared: bool = True) -> tuple[dict[str, Any], bool]:
    """``config``'s run finished, whatever its state: read back when done, resumed when started, else trained.
    Returns ``(results, executed)``. The state is read under the run lock, so of two processes sharing an
    ``out_dir`` (``bench --workers``) the second one reads back what the first finished and never evaluates
    the run on test a second time."""
    run_dir = Path(config.out_dir) / config.name
    with _run_lock(run_dir):
        if (run_dir / "results.json").is_file():
            return json.loads((run_dir / "results.json").read_text()), False
        started = (run_dir / "config.yaml").is_file()
        return _train(read_run_config(run_dir) if started else config, run_dir, fresh=not started, console=console,
                      log=log, wait_for_shared=wait_for_shared), True


