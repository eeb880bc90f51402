"""Glue between methods and the engine: datasets of a split, a training stage, loading a stage's model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semiseg.data.datasets import SegmentationDataset
from semiseg.data.transforms import strong_transform, weak_transform
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.task import TrainingTask
from semiseg.engine.trainer import FitResult, Trainer
from semiseg.evaluation.evaluator import evaluate_arrays
from semiseg.models.factory import build_model
from semiseg.pipeline.context import RunContext


def new_model(ctx: RunContext, seed: int | None = None) -> nn.Module:
    """A freshly initialised model of the run's architecture: the run's shared initialisation
    (:attr:`RunContext.init_seed`), or one seeded by ``seed`` where a method needs a different one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.init_seed if seed is None else seed)
        return build_model(ctx.config.model, ctx.classes.num_classes)


def make_dataset(ctx: RunContext, images: np.ndarray, masks: np.ndarray | None, indices: Sequence[int], *,
                 seed: int, strong: bool = False, transform=None) -> SegmentationDataset:  # noqa: ANN001
    aug = ctx.config.train.augment
    weak = transform or weak_transform(tuple(ctx.config.data.size), scale=tuple(aug.scale),
                                       pad_label=aug.pad_label, hflip=aug.hflip, vflip=aug.vflip)
    return SegmentationDataset(images, masks, list(indices), weak, strong=strong_transform() if strong else None,
                               seed=seed)


def make_loader(ctx: RunContext, dataset: SegmentationDataset, batch_size: int, seed: int) -> EndlessLoader:
    return EndlessLoader(dataset, batch_size, seed=seed, num_workers=ctx.config.train.num_workers,
                         rank=ctx.dist.rank, world_size=ctx.dist.world_size)


def labeled_loader(ctx: RunContext, seed: int, batch_size: int | None = None) -> EndlessLoader:
    arrays = ctx.arrays("labeled")
    ds = make_dataset(ctx, arrays.images, arrays.masks, range(len(arrays.stems)), seed=seed)
    return make_loader(ctx, ds, batch_size or ctx.config.train.batch_size, seed)


def validation_fn(ctx: RunContext):  # noqa: ANN201
    """Validation on working-size cached arrays (fast, every ``eval_every`` steps)."""
    val = ctx.arrays("val")

    def evaluate(net: nn.Module) -> dict[str, float]:
        result = evaluate_arrays(net, val.images, val.masks, classes=ctx.classes, device=ctx.device,
                                 stems=val.stems)
        flat = result.to_dict()
        return {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and k != "n_images"}

    return evaluate


def fit(ctx: RunContext, task: TrainingTask, stage_dir: Path, *, steps: int | None = None) -> FitResult:
    trainer = Trainer(task, ctx.config.train, stage_dir, device=ctx.device, dist=ctx.dist,
                      evaluate=validation_fn(ctx), val_metric=ctx.val_metric, steps=steps, console=ctx.console)
    return trainer.fit()


def load_stage_model(ctx: RunContext, stage_dir: Path, which: str = "best") -> nn.Module:
    """The model a training stage selected (``best``: best on validation) or its final weights."""
    model = build_model(ctx.config.model, ctx.classes.num_classes)
    if which == "best" and (stage_dir / "checkpoints" / "best.pt").exists():
        model.load_state_dict(load_checkpoint(stage_dir / "checkpoints" / "best.pt")["net"])
    else:
        state = load_checkpoint(stage_dir / "checkpoints" / "last.pt")
        model.load_state_dict(state["nets"][which if which != "best" else next(iter(state["nets"]))])
    return model.to(ctx.device).eval()
