"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""


class SemisegError(Exception):
    """Base of every error that is the user's input, not a bug."""


class DataError(SemisegError, ValueError):
    """A data file or folder cannot be used; the message names the file and the problem."""


class ConfigError(SemisegError, ValueError):
    """A config key or value is wrong; the message names the key."""
