"""Glue between methods and the engine: datasets of a split, a training stage, loading a stage's model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semiseg.data.datasets import SegmentationDataset
from semiseg.data.transforms import PairTransform, strong_transform, weak_transform
from semiseg.engine.loader import EndlessLoader, resolve_num_workers
from semiseg.engine.task import TrainingTask
from semiseg.engine.trainer import FitResult, Trainer
from semiseg.evaluation.evaluator import evaluate_arrays
from semiseg.models.factory import build_model, param_group_of, unwrap
from semiseg.pipeline.context import RunContext


def new_model(ctx: RunContext, seed: int | None = None) -> nn.Module:
    """A freshly initialised model of the run's architecture: the run's shared initialisation
    (:attr:`RunContext.init_seed`), or one seeded by ``seed`` where a method needs a different one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.init_seed if seed is None else seed)
        return build_model(ctx.config.model, ctx.classes.num_classes)


def make_dataset(ctx: RunContext, images: np.ndarray, masks: np.ndarray | None, indices: Sequence[int], *,
                 seed: int, strong: bool | PairTransform = False, strong_views: int = 1,
                 transform: PairTransform | None = None) -> SegmentationDataset:
    """``strong``: True for ST++'s strong augmentation, or a transform of its own (e.g. without cutout)."""
    aug = ctx.config.train.augment
    weak = transform or weak_transform(tuple(ctx.config.data.size), scale=tuple(aug.scale),
                                       pad_label=aug.pad_label, hflip=aug.hflip, vflip=aug.vflip)
    strong_t = strong_transform() if strong is True else (strong or None)
    return SegmentationDataset(images, masks, list(indices), weak, strong=strong_t, strong_views=strong_views,
                               seed=seed)


def make_loader(ctx: RunContext, dataset: SegmentationDataset, batch_size: int, seed: int) -> EndlessLoader:
    """Worker processes per ``train.num_workers`` (``auto``: on CUDA only); on CUDA batches come in pinned memory,
    so the loop's host-to-device copies are asynchronous."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = resolve_num_workers(ctx.config.train.num_workers, ctx.device, local)
    return EndlessLoader(dataset, batch_size, seed=seed, num_workers=workers, rank=ctx.dist.rank,
                         world_size=ctx.dist.world_size, pin_memory=ctx.device.type == "cuda")


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
        return {k: float(v) for k, v in flat.items() if isinstance(v, int | float) and not k.startswith("n_")}

    return evaluate


def fit(ctx: RunContext, task: TrainingTask, stage_dir: Path, *, steps: int | None = None) -> FitResult:
    trainer = Trainer(task, ctx.config.train, stage_dir, device=ctx.device, dist=ctx.dist,
                      evaluate=validation_fn(ctx), val_metric=ctx.val_metric, steps=steps, console=ctx.console)
    return trainer.fit()


# a delivered network whose decoder + classifier moved less than this (relative L2) from the run's shared
# initialisation has barely trained (e.g. an EMA copy updated a handful of times); its results say so
MOVED_WARNING = 0.05


@torch.no_grad()
def moved_from_init(ctx: RunContext, model: nn.Module) -> dict[str, float]:
    """Relative L2 distance ``||θ − θ₀|| / ||θ₀||`` of each parameter group (encoder / decoder / classifier)
    of ``model`` from the run's shared initialisation (:func:`new_model`)."""
    init = dict(new_model(ctx).named_parameters())
    sq_diff: dict[str, float] = {}
    sq_init: dict[str, float] = {}
    for name, p in unwrap(model).named_parameters():
        group = param_group_of(name)
        p0 = init[name].to(p.device, torch.float32)
        sq_diff[group] = sq_diff.get(group, 0.0) + float((p.float() - p0).pow(2).sum())
        sq_init[group] = sq_init.get(group, 0.0) + float(p0.pow(2).sum())
    return {g: round((sq_diff[g] / sq_init[g]) ** 0.5, 6) if sq_init[g] > 0 else float("nan") for g in sq_diff}


def barely_moved_warning(moved: dict[str, float]) -> str | None:
    """A warning when the delivered decoder + classifier barely left their initialisation."""
    head = [moved[g] for g in ("decoder", "classifier") if g in moved]
    if head and max(head) < MOVED_WARNING:
        return (f"the delivered network barely moved from its initialisation (decoder/classifier relative change "
                f"{max(head):.3f} < {MOVED_WARNING}): it is close to untrained; check the method's schedules "
                "(EMA cadence and momentum, warm-ups) against train.steps")
    return None
