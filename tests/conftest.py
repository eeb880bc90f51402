"""Suite-wide settings: one CPU thread per test process.

`make test` runs the suite on one pytest-xdist worker per core; tiny models gain nothing from intra-op threads, and
several workers each spawning a thread per core would oversubscribe the machine. Subprocesses (CLI and kill/resume
tests) inherit the environment variable.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment so torch's pools start with one thread)

torch.set_num_threads(1)
