"""Staged pipelines: each stage persists into ``stages/<i>-<name>/`` and is DONE once, atomically.

A stage with the same content key (its inputs and config) as one already computed under the same
``out_dir`` is reused instead of recomputed: e.g. the supervised teacher shared by several methods.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semiseg.atomic import atomic_write_text, publish_directory
from semiseg.engine.distributed import DistInfo, barrier
from semiseg.errors import StageBusyError
from semiseg.layout import RunLayout, StageLayout, is_done
from semiseg.locks import exclusive


@dataclass
class Stage:
    """``run(stage_dir)`` does the work (resuming from whatever it left in ``stage_dir``).

    ``key`` is everything the outputs depend on (config sections, split, upstream keys); a stage
    whose key is None is never reused.
    """

    name: str
    run: Callable[[Path], None]
    key: dict[str, Any] | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    def key_hash(self) -> str | None:
        return key_hash(self.key)


def key_hash(key: dict[str, Any] | None) -> str | None:
    """The short hash a content key is indexed by (None: never reused)."""
    if key is None:
        return None
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


CLOCK_EVERY = 30.0  # seconds between two records of a running stage's time (a kill loses at most this much)


def _reuse_index(out_dir: Path) -> Path:
    return out_dir / ".stage-index"


def find_reusable(out_dir: Path, key_hash: str) -> Path | None:
    entry = _reuse_index(out_dir) / key_hash
    if not entry.is_file():
        return None
    path = Path(entry.read_text().strip())
    path = path if path.is_absolute() else (out_dir / path)
    return path if is_done(path) else None


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stages(run_dir: Path, stages: list[Stage], *, out_dir: Path | None = None, dist: DistInfo | None = None,
               log: Callable[[str], None] = print, wait_for_shared: bool = True) -> list[Path]:
    """Run every stage not DONE yet, in order. Returns the stage directories.

    A stage another process is computing right now (same content key, same ``out_dir``) is waited for and
    reused; with ``wait_for_shared=False`` :class:`StageBusyError` is raised instead (under torchrun stages are
    not locked)."""
    dist = dist or DistInfo()
    out_dir = out_dir or run_dir.parent
    dirs = []
    for i, stage in enumerate(stages):
        path = RunLayout(run_dir).stage(i, stage.name).path
        dirs.append(path)
        if is_done(path):
            log(f"stage {i}-{stage.name}: done, skipped")
            continue
        key_hash = stage.key_hash()
        with _computing_once(out_dir, key_hash, dist, f"stage {i}-{stage.name}", log, wait=wait_for_shared):
            reusable = find_reusable(out_dir, key_hash) if key_hash else None
            if reusable is not None and reusable.resolve() != path.resolve():
                if dist.is_main:
                    log(f"stage {i}-{stage.name}: identical to {reusable}, reused")
                    _copy_stage(reusable, path)
                barrier()
                continue
            _run_stage(stage, path, key_hash, out_dir, dist, f"stage {i}-{stage.name}", log)
    return dirs


def _run_stage(stage: Stage, path: Path, key_hash: str | None, out_dir: Path, dist: DistInfo, label: str,
               log: Callable[[str], None]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    log(f"{label}: running")
    with stage_clock(path, enabled=dist.is_main, every=CLOCK_EVERY) as seconds:
        stage.run(path)
    barrier()
    if dist.is_main:
        info = {"stage": stage.name, "key": key_hash, "seconds": round(seconds(), 2), "seconds_all_sessions": True,
                "peak_rss_mb": round(_peak_rss_mb(), 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(StageLayout(path).done, json.dumps(info, indent=1))
        if key_hash:
            index = _reuse_index(out_dir)
            index.mkdir(parents=True, exist_ok=True)
            atomic_write_text(index / key_hash, os.path.relpath(path, out_dir))
    barrier()


@contextmanager
def stage_clock(path: Path, *, enabled: bool = True, every: float = CLOCK_EVERY) -> Iterator[Callable[[], float]]:
    """Seconds a stage has computed over every session: this session's plus those an earlier, interrupted session
    recorded in ``elapsed.json``. The file is refreshed every ``every`` seconds and when the stage ends, so a kill
    or a failure loses at most that much of the count and a stage resumed across sessions reports its whole time.
    A session that fails before its first beat (bad input found at the start) leaves the file as it was."""
    file = StageLayout(path).elapsed
    try:
        before = float(json.loads(file.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        before = 0.0
    start = time.monotonic()

    def seconds() -> float:
        return before + time.monotonic() - start

    def record() -> None:
        atomic_write_text(file, json.dumps({"seconds": round(seconds(), 2)}))

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            record()

    thread = threading.Thread(target=beat, name="stage-clock", daemon=True) if enabled else None
    if thread:
        thread.start()
    try:
        yield seconds
    finally:
        if thread:
            stop.set()
            thread.join()
    if enabled:
        record()


@contextmanager
def _computing_once(out_dir: Path, key_hash: str | None, dist: DistInfo, label: str,
                    log: Callable[[str], None], *, wait: bool) -> Iterator[None]:
    """A shareable stage is computed by one process at a time: a second bench process that needs the same
    teacher waits for the first, then finds it finished and reuses it. Under torchrun nothing is locked: a long
    wait of rank 0 would time out the other ranks at their barrier."""
    if key_hash is None or dist.enabled:
        yield
        return
    lock = exclusive(
        _reuse_index(out_dir) / f"{key_hash}.lock", what=f"the shared {label}", wait=wait, busy=StageBusyError,
        on_wait=lambda holder: log(f"{label}: {holder} is computing the identical stage; waiting to reuse it"))
    with lock:
        yield


def _copy_stage(src: Path, dst: Path) -> None:
    """Copy a finished stage (checkpoints hard-linked where the file system allows)."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    with publish_directory(dst) as tmp:
        shutil.copytree(src, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
        done = StageLayout(tmp).done
        info = json.loads(done.read_text())
        info["reused_from"] = str(src)
        done.unlink()  # it may be a hard link to the source's marker
        done.write_text(json.dumps(info, indent=1))
