"""Run the real CLI in a subprocess with tiny, CPU-sized settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = ["data.size=[64,64]", "data.options.n=48", "model.decoder_channels=[16,16,16,8,8]",
        "train.steps=12", "train.eval_every=6", "train.checkpoint_every=3", "train.batch_size=4",
        "train.progress=false", "train.threads=1", "split.labeled=0.25", "split.val=0.2", "split.test=0.2"]


def env(tmp_path: Path) -> dict[str, str]:
    # src first; a PYTHONPATH already set (packages installed to a folder of their own) stays behind it
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "SEMISEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def semiseg(args: list[str], tmp_path: Path, *, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "semiseg", *args], env=env(tmp_path), capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)
    if check and proc.returncode != 0:
        raise AssertionError(f"semiseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_args(name: str, out_dir: Path, extra: list[str] | None = None) -> list[str]:
    sets = [*TINY, f"name={name}", f"out_dir={out_dir}", *(extra or [])]
    return ["train", *[x for s in sets for x in ("--set", s)]]
