"""ST++'s stability score (released code ``select_reliable``): snapshots of the supervised stage, each
unlabeled image scored by how its snapshots' predictions agree with the final one, split into halves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from semiseg.atomic import atomic_write_text
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.hooks import Snapshots
from semiseg.layout import StageLayout
from semiseg.methods.supervised import SupervisedTask
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.labeling import ground_truth_fn, make_labeler, unlabeled_index
from semiseg.pipeline.plan import Pipeline, StageRef
from semiseg.pipeline.training import new_model
from semiseg.pseudo.policies import image_miou, split_reliable, stability_scores


def snapshot_task(model: nn.Module, loader: Any, stage: Path, steps: list[int], *, is_main: bool = True,
                  **kwargs: Any) -> SupervisedTask:
    """The supervised step (``kwargs``: its loss), plus the model's weights saved after ``steps`` (a hook)."""
    task = SupervisedTask(model, loader, **kwargs)
    task.hooks = [Snapshots(lambda: task.nets["model"], steps, lambda step: snapshot_path(stage, step),
                            is_main=is_main)]
    return task


def snapshot_path(stage: Path, step: int) -> Path:
    return StageLayout(stage).snapshot(step)


def snapshot_steps(steps: int, k: int) -> list[int]:
    """ST++'s checkpoints in steps: ``j * steps // k`` for j = 1..k (the last one is the final model)."""
    return [j * steps // k for j in range(1, k + 1)]


def add_stability(pipeline: Pipeline, supervised: StageRef, k: int) -> StageRef:
    """A stage scoring every unlabeled image by ST++'s stability, written to ``stability.json``.

    The K snapshots of ``supervised`` (the reference, its final weights, last) each predict every image once,
    argmax, no TTA, streaming in lockstep. The score is the mean per-image mIoU of snapshots 1..K-1 against
    snapshot K; the top half (``len // 2``) is reliable. In benchmark mode the file also records how the final
    snapshot's labels score against ground truth in each half, to check that stability tracks quality.
    """
    run = pipeline.run

    def work(stage: Path) -> None:
        out = stage / "stability.json"
        if out.exists() or not run.dist.is_main:
            return
        stems = list(run.splits.unlabeled)
        index = unlabeled_index(run, stems)
        stem_of = dict(zip(index, stems, strict=True))
        images = run.arrays("unlabeled").images
        c = run.classes.num_classes
        streams = [make_labeler(run, m).iter_predictions(images, index) for m in snapshot_models(supervised, k)]
        gt = ground_truth_fn(run, stems)
        scores, finals = [], {}
        for preds in zip(*streams, strict=True):
            maps = [p.argmax(0).astype(np.uint8) for _, p in preds]
            scores.append(float(stability_scores([[m] for m in maps], num_classes=c)[0]))
            if gt is not None:
                stem = stem_of[preds[0][0]]
                finals[stem] = image_miou(maps[-1], gt(stem), c)
        reliable, unreliable = split_reliable(stems, scores)
        info: dict[str, Any] = {"stems": stems, "scores": [None if math.isnan(s) else s for s in scores],
                                "reliable": reliable, "unreliable": unreliable, "quality": None}
        if gt is not None:
            info["quality"] = {"final_snapshot_miou_reliable": _nanmean([finals[s] for s in reliable]),
                               "final_snapshot_miou_unreliable": _nanmean([finals[s] for s in unreliable])}
        atomic_write_text(out, json.dumps(info, indent=1))

    return pipeline.add("stability", work, inputs=[supervised], variant={"k": k})


def snapshot_models(supervised: StageRef, k: int) -> list[nn.Module]:
    """The supervised stage's snapshots at ``j * steps // k`` (j < k) and its final weights (``last.pt``)."""
    run = supervised.run
    steps = snapshot_steps(run.config.train.steps, k)
    models = [_snapshot_model(run, snapshot_path(supervised.path, s)) for s in steps[:-1]]
    return [*models, supervised.model(which="last")]


def _snapshot_model(run: RunContext, path: Path) -> nn.Module:
    model = new_model(run)
    model.load_state_dict(load_checkpoint(path)["net"])
    return model.to(run.device).eval()


def _nanmean(values: list[float]) -> float | None:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else None
