"""Where a result came from: the commit of the code that ran and the command line, without paths of this
machine (result files are committed and shared)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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
