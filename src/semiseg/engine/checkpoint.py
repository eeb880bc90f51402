"""Atomic checkpoint files and the RNG state that makes a resumed run equal an uninterrupted one.

Checkpoints hold only tensors and plain Python values (dicts, lists, numbers, strings) so that they load
with ``torch.load(weights_only=True)``: a crafted ``.pt`` file in a run directory cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semiseg.atomic import atomic_path
from semiseg.errors import OUTPUT_ERRNOS, CheckpointError, OutputError, output_error


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file: a kill mid-write (or a full disk) never leaves a broken
    checkpoint; the previous file stays intact. A failed write is an :class:`OutputError` naming ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(path, err) from None

    def failed(err: BaseException, tmp: Path) -> BaseException:
        # torch's zip writer reports a full disk as a RuntimeError without the errno: look at the disk
        # while the partial temporary file still fills it
        if isinstance(err, RuntimeError) and _nearly_full(path.parent):
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if isinstance(err, OSError) and err.errno in OUTPUT_ERRNOS:
            kept = " (the previous file is intact)" if path.exists() else ""
            return OutputError(f"{output_error(path, err)}{kept}")
        return err

    with atomic_path(path, on_error=failed) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", *, finite: bool = False) -> dict[str, Any]:
    """A checkpoint, loaded with ``weights_only=True``: a file holding anything but tensors and plain
    values (a pickle that would run code) is refused, as is a truncated or corrupt file, with its path.
    ``finite``: also refuse non-finite network weights (a training state to resume from must be sound)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise CheckpointError(
            f"{path}: refused: the file holds Python objects other than tensors and plain values"
            f"{f' ({found.group(1)})' if found else ''}, so loading it could run code; semiseg never writes such "
            "files. Do not use it; delete it and train (or resume) again") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:160] if str(err) else 'no detail'}); delete it "
                              "to restart from the one before, or train again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a semiseg checkpoint (holds a {type(state).__name__}, not a dict)")
    bad = _non_finite(state.get("nets", state.get("net"))) if finite else []
    if bad:
        raise CheckpointError(f"{path}: holds non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}"
                              "), so it cannot be resumed from; semiseg never saves such weights, the file was "
                              "damaged or replaced. Delete it to train its stage again from the stage's start")
    return state


def _non_finite(weights: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in (nested dicts of) ``weights`` holding NaN or inf."""
    if torch.is_tensor(weights):
        return [prefix] if weights.is_floating_point() and not bool(torch.isfinite(weights).all()) else []
    if isinstance(weights, dict):
        return [k for key, v in weights.items() for k in _non_finite(v, f"{prefix}.{key}" if prefix else str(key))]
    return []


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain lists and tensors (loadable with ``weights_only``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys.cpu().numpy() if torch.is_tensor(keys) else keys, dtype=np.uint32),
                         pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # a checkpoint loaded with map_location=cuda brings these to the GPU, but generators take CPU byte tensors;
        # a machine with fewer GPUs than the one that saved restores the ones it has
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"][:torch.cuda.device_count()]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def file_hash(path: Path, length: int = 16) -> str:
    """Short content hash of a file (checkpoint provenance)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
