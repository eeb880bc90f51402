"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""


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


class TrainingDiverged(SemisegError):
    """The loss or gradients became non-finite; names the stage, the step and the remedies."""


class RunInterrupted(SemisegError):
    """Ctrl-C (SIGINT) during a run; the message says how to continue it."""

    exit_code = 130
