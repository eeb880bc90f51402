"""Helpers of the safety tests: the CLI in-process, tiny folder datasets, a tiny run, a crafted pickle."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# a 0.3M-parameter network and 32x32 images: a run takes about two seconds on one core
TINY = ["data.size=[32,32]", "model.encoder=tu-mobilenetv3_small_050", "model.weights=none",
        "model.decoder_channels=[16,16,16,8,8]",
        "train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.batch_size=4",
        "train.progress=false", "train.threads=1", "split.labeled=0.4", "split.val=0.2", "split.test=0.2"]


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(args: list[str], capsys: pytest.CaptureFixture) -> Result:
    """``semiseg ARGS`` in this process (no interpreter start-up): exit status, stdout, stderr."""
    from semiseg.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return Result(code if isinstance(code, int) else 1, captured.out, captured.err)


def sets(*items: str) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def make_folder(root: Path, n: int = 15, size: int = 24, unlabeled: int = 0) -> Path:
    """``root/images/*.png`` + binary ``root/masks/*.png`` (values 0/1), optionally ``root/unlabeled``."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[4 + i % 5: 14 + i % 5, 6:16] = 1
        image[mask == 1] //= 3
        Image.fromarray(image).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"img{i:02d}.png")
    if unlabeled:
        (root / "unlabeled").mkdir(exist_ok=True)
        for i in range(unlabeled):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "unlabeled" / f"u{i}.png")
    return root


def set_mask_value(path: Path, value: int) -> None:
    mask = np.array(Image.open(path))
    mask[0, 0] = value
    Image.fromarray(mask).save(path)


class Payload:
    """Pickles to a call that creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    """Replace ``path`` by a checkpoint that runs code when loaded with ``weights_only=False``."""
    torch.save({"net": Payload(marker), "nets": {"model": Payload(marker)}, "step": 0}, path)


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``path`` with its size and mtime: to assert that nothing was (half-)written."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file()}


def use_cache(path: Path) -> None:
    os.environ["SEMISEG_CACHE"] = str(path)
