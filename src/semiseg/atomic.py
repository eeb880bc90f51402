"""Atomic file writes: a temporary file next to the target, fsynced and renamed over it.

A reader (or a later run after a kill, a crash or a full disk) sees either the previous file or the new one,
never a half-written file. A write that fails because of where it goes (disk full, read-only folder, no
permission) is an :class:`~semiseg.errors.OutputError` naming the target.

A SIGKILL runs no clean-up, so every temporary name carries its writer (:func:`writer_tag`: pid and host), and
:func:`remove_stale_temporaries` lets the next command in a folder remove what dead writers left, never what a
live one is writing.

A whole folder is published the same way (:func:`publish_directory`): built in a hidden sibling named with its
writer, fsynced, renamed into place; the run directory, a reused stage, a pseudo-label round, a decoded-data
cache entry and a synthetic data set all appear through it.

Standard library only (plus :mod:`semiseg.errors`): every layer may use it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from semiseg.errors import OUTPUT_ERRNOS, output_error


@contextmanager
def atomic_path(path: Path | str, *, mode: int | None = None,
                on_error: Callable[[BaseException, Path], BaseException] | None = None) -> Iterator[Path]:
    """A temporary path next to ``path`` to write into; on normal exit it replaces ``path``.

    The temporary file exists (empty) when the block starts; its name is hidden
    (``.<name>.<writer tag>.<random>.tmp<suffix>``)
    and ends in ``path``'s suffix, so a writer that picks the format from the suffix (PIL, onnx) works. On
    normal exit it is fsynced, chmod'ed to ``mode`` when given (otherwise it keeps mkstemp's 0600) and renamed
    over ``path``. On any exception (in the block, the fsync or the rename) it is removed and the exception
    re-raised; an ``OSError`` whose errno is in :data:`~semiseg.errors.OUTPUT_ERRNOS` becomes an ``OutputError``
    naming ``path``. ``on_error(err, tmp)`` is called first, while the temporary file still exists, and returns
    the exception to raise instead (``err`` itself to keep it). A temporary file that cannot be created at all
    is an ``OutputError`` naming ``path`` (the folder is the problem). The parent folder must exist.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{writer_tag()}.",
                                    suffix=f".tmp{path.suffix}")
    except OSError as err:
        raise output_error(path, err) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            raised = on_error(err, tmp) if on_error is not None else err
        finally:
            tmp.unlink(missing_ok=True)
        if isinstance(raised, OSError) and raised.errno in OUTPUT_ERRNOS:
            raise output_error(path, raised) from None
        if raised is err:
            raise
        raise raised from None


def atomic_write_bytes(path: Path | str, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`), creating the parent folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in OUTPUT_ERRNOS:
            raise output_error(path, err) from None
        raise
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: Path | str, text: str, *, mode: int | None = None) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically, newlines as given (no platform translation)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


@contextmanager
def publish_directory(final: Path | str, *, replace: bool = True, mode: int | None = None) -> Iterator[Path]:
    """A hidden temporary folder next to ``final`` to fill; on normal exit it is fsynced and renamed to
    ``final`` in one step, so ``final`` is never seen half-made.

    An existing ``final`` is first moved aside and removed (``replace=True``; open files in it stay valid), or
    the rename fails (``replace=False``: an ``OSError`` when another writer published first, which the caller may
    check). On any exception the temporary folder is removed; a SIGKILL leaves it named with its writer
    (:func:`writer_tag`) for :func:`remove_stale_temporaries`. ``mode``: the folder's permissions (mkdtemp's 0700
    otherwise). The parent folder is created."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{writer_tag()}.", suffix=".tmp", dir=final.parent))
    except OSError as err:
        if err.errno in OUTPUT_ERRNOS:
            raise output_error(final, err) from None
        raise
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        fsync_dir(tmp)
        if replace and final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.{writer_tag()}.", suffix=".old", dir=final.parent))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (after a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()
_TAGGED = re.compile(r"^\..*\.w(\d+)h([0-9a-f]{6})\.")


def writer_tag() -> str:
    """``w<pid>h<host digest>``: put in a temporary's name, it tells a later process whose temporary it is."""
    return f"w{os.getpid()}h{_HOST}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: Path, *, recursive: bool = True) -> list[Path]:
    """Remove the hidden temporaries (files and folders named with :func:`writer_tag`) in ``folder`` (and below
    it) whose writer ran on this host and is dead: what a SIGKILL mid-write left. A live writer's, or one of
    another host (whose processes cannot be seen from here), stays. Returns what was removed."""
    removed: list[Path] = []
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            found = _TAGGED.match(name)
            if found is None or found.group(2) != _HOST or _alive(int(found.group(1))):
                continue
            path = Path(root) / name
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError:
                continue  # a read-only folder: left for a command that can write there
            removed.append(path)
        dirs[:] = [d for d in dirs if recursive and not _TAGGED.match(d)]
    return removed
