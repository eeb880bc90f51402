"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations

import errno
from pathlib import Path


class SemisegError(Exception):
    """Base of every error that is the user's input, not a bug. ``exit_code`` is the CLI's exit status."""

    exit_code = 2


class DataError(SemisegError, ValueError):
    """A data file or folder cannot be used; the message names the file and the problem."""


class ConfigError(SemisegError, ValueError):
    """A config key or value is wrong; the message names the key."""


class CheckpointError(SemisegError):
    """A checkpoint or weight file is unreadable, unsafe (carries code) or holds unusable weights."""


class RunChangedError(SemisegError):
    """A run directory's config or data changed since the run was made; the message names what changed."""


class OutputError(SemisegError):
    """A file could not be written (disk full, read-only folder, no permission); names the file."""


# OSError numbers of a write that failed because of where it went (not a bug): reported as OutputError
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def output_error(path: Path, err: OSError) -> OutputError:
    """A one-line error for a write to ``path`` that failed (disk full, read-only, no permission)."""
    what = "no space left on the device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    return OutputError(f"{path}: cannot write ({what})")


class TrainingDiverged(SemisegError):
    """The loss or gradients became non-finite; names the stage, the step and the remedies."""


class RunBusyError(SemisegError):
    """Another process is training this run right now (its lock is held); names the holder."""

    exit_code = 75  # EX_TEMPFAIL: the same command works once the other process is done


class StageBusyError(RunBusyError):
    """Another process is computing a stage this run would reuse (raised only where the caller asked not to
    wait: a bench then trains another run first)."""


class RunInterrupted(SemisegError):
    """Ctrl-C (SIGINT) during a run; the message says how to continue it."""

    exit_code = 130
