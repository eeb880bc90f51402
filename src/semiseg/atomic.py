"""Atomic file writes: a temporary file next to the target, fsynced and renamed over it.

A reader (or a later run after a kill, a crash or a full disk) sees either the previous file or the new one,
never a half-written file. A write that fails because of where it goes (disk full, read-only folder, no
permission) is an :class:`~semiseg.errors.OutputError` naming the target.

Standard library only (plus :mod:`semiseg.errors`): every layer may use it. Publishing a whole folder with
``os.replace`` is a different operation and is not done here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from semiseg.errors import OUTPUT_ERRNOS, output_error


@contextmanager
def atomic_path(path: Path | str, *, mode: int | None = None,
                on_error: Callable[[BaseException, Path], BaseException] | None = None) -> Iterator[Path]:
    """A temporary path next to ``path`` to write into; on normal exit it replaces ``path``.

    The temporary file exists (empty) when the block starts; its name is hidden (``.<name>.<random>.tmp<suffix>``)
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
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
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
