"""Advisory locks between processes that share an output folder (two ``semiseg bench`` on two cores).

A run is trained by one process at a time: a second ``run``/``resume``/``bench`` of the same run gets a
:class:`~semiseg.errors.RunBusyError` naming the holder instead of writing the same checkpoints at once. A
shared stage (the supervised teacher several methods reuse) is computed once: a second process waits for
the first and then reuses its result.

``fcntl.flock`` locks: the kernel releases them when the holder exits, however it exits (a SIGKILL leaves no
stale lock). The lock file holds the holder's pid and host for the message and stays behind, except where
the holder asks to discard it (a run that never came to exist); a process that locked a file meanwhile
removed checks that and takes the lock again. Where ``fcntl`` is missing (Windows) nothing is locked.
Standard library only (plus :mod:`semiseg.errors`): every layer may use it.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from semiseg.errors import RunBusyError, output_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def run_lock_path(run_dir: Path) -> Path:
    """Where the lock of a run lives: beside it (a fresh run's directory appears whole, by one rename)."""
    return run_dir.parent / ".locks" / f"{run_dir.name}.lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextmanager
def exclusive(path: Path, *, what: str, wait: bool = False, on_wait: Callable[[str], None] | None = None,
              busy: type[RunBusyError] = RunBusyError, discard: Callable[[], bool] | None = None) -> Iterator[None]:
    """Hold the lock ``path`` for the block.

    ``wait=False``: raise ``busy`` ("``what`` is in use by pid N on HOST since ...") when another process holds
    it. ``wait=True``: block until it is free, calling ``on_wait(holder)`` once first. When ``discard()`` is true
    on release the lock file is removed (and its folder when empty): a run that never came to exist leaves
    nothing behind. A file system that cannot lock (``ENOLCK``, ``EOPNOTSUPP``: some network mounts) runs the
    block unlocked.
    """
    handle = _acquire(path, what, wait, on_wait, busy) if fcntl is not None else None
    if handle is None:
        yield
        return
    try:
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        try:
            if discard is not None and discard():
                path.unlink(missing_ok=True)  # while still held: a waiter checks that it locked the file at path
                with suppress(OSError):
                    path.parent.rmdir()
        finally:
            handle.close()  # releases the lock


def _acquire(path: Path, what: str, wait: bool, on_wait: Callable[[str], None] | None,
             busy: type[RunBusyError]) -> IO[str] | None:
    """The open, locked, emptied lock file; None where the file system cannot lock."""
    told = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 - held open while the lock is
        except FileNotFoundError:
            continue  # a holder discarding its lock removed the folder between mkdir and open
        except OSError as err:
            raise output_error(path, err) from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(path)
                if not wait:
                    raise busy(f"{what} is in use by {holder}; wait for it to finish (or stop it), "
                               "then run the command again") from None
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            handle.close()
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                warnings.warn(f"{path}: this file system cannot lock files, so processes sharing this folder are not "
                              "kept apart (give each one its own runs)", RuntimeWarning, stacklevel=3)
                return None
            raise
        except BaseException:
            handle.close()
            raise
        # the holder before us may have removed the file it locked (discard): ours must be the one at path
        try:
            current = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            handle.seek(0)
            handle.truncate()
            return handle
        handle.close()
