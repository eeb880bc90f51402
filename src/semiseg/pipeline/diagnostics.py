"""Benchmark-mode diagnostics of staged methods: pseudo-label quality against the unlabeled ground truth, each
model's scores on the reference (unlabeled) set and on test, and the last stage that tabulates them.

Everything here is a diagnostic: written to ``diagnostics.json`` (merged into ``results.json``), never used to
select or train anything. Test figures are computed as ``results.json`` computes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from semiseg.atomic import atomic_write_text
from semiseg.data.classes import IGNORE_INDEX
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.evaluation.evaluator import evaluate_arrays, evaluate_source, foreground_index
from semiseg.evaluation.metrics import ConfusionMatrix, ForegroundScores
from semiseg.layout import StageLayout, is_done
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.plan import Pipeline, StageRef


def quality_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures of a round's stats a diagnostics table keeps."""
    q = stats.get("quality") or {}
    keep = ("foreground_dice", "foreground_iou", "miou", "pixel_accuracy", "scored_pixels")
    return {"coverage": stats.get("coverage"), **{k: q.get(k) for k in keep if k in q}}


def rounds_quality(run: RunContext, rounds: Sequence[StageRef]) -> dict[str, Any]:
    """Quality of several rounds pooled (e.g. both ATSO halves), scored like the store scores one round:
    selected pixels only, against the unlabeled ground truth."""
    gt = run.unlabeled_ground_truth()
    assert gt.masks is not None
    where = {s: i for i, s in enumerate(gt.stems)}
    cm, fg_index = ConfusionMatrix(run.classes.num_classes), foreground_index(run.classes)
    fg = ForegroundScores(fg_index) if fg_index is not None else None
    selected = total = 0
    for ref in rounds:
        rnd = ref.round()
        for stem in rnd.stems:
            if stem not in where:
                continue
            label = rnd.labels(stem)
            target = np.where(label == IGNORE_INDEX, IGNORE_INDEX, np.asarray(gt.masks[where[stem]])).astype(np.uint8)
            pred = np.where(label == IGNORE_INDEX, 0, label).astype(np.uint8)
            cm.update(pred, target)
            if fg is not None:
                fg.update(pred, target, stems=[stem])
            selected, total = selected + int((label != IGNORE_INDEX).sum()), total + label.size
    out: dict[str, Any] = {"coverage": selected / total if total else None, "miou": cm.miou(),
                           "pixel_accuracy": cm.pixel_accuracy(), "scored_pixels": cm.total}
    if fg is not None:
        s = fg.summary()
        out.update(foreground_dice=s["dice"], foreground_iou=s["iou"])
    return out


def _headline(result: Any, metric: str) -> dict[str, Any]:
    d = result.to_dict()
    out = {k: d.get(k) for k in ("dice", "iou", "miou", "pixel_accuracy")}
    try:
        out["headline"] = result.headline(metric)
    except KeyError:
        out["headline"] = result.headline()
    return out


def scores_on_test(run: RunContext, model: nn.Module) -> dict[str, Any] | None:
    """Test figures of a model at original resolution, as ``results.json`` reports them."""
    if not run.test_stems:
        return None
    cfg = run.config
    res = evaluate_source(model, run.source, run.test_stems, protocol=cfg.eval.protocol,
                          size=tuple(cfg.data.size), window=cfg.eval.window, stride=cfg.eval.stride,
                          device=run.device)
    return _headline(res, run.val_metric)


def scores_on_reference(run: RunContext, model: nn.Module, stems: Sequence[str]) -> dict[str, Any] | None:
    """A model's accuracy on unlabeled images (``stems``) against their ground truth."""
    gt = run.unlabeled_ground_truth()
    wanted = set(stems)
    idx = [i for i, s in enumerate(gt.stems) if s in wanted]
    if not idx or gt.masks is None:
        return None
    res = evaluate_arrays(model, np.asarray(gt.images[idx]), np.asarray(gt.masks[idx]), classes=run.classes,
                          device=run.device, stems=[gt.stems[i] for i in idx])
    return _headline(res, run.val_metric)


def stage_rows(pipeline: Pipeline) -> dict[str, list[dict[str, Any]]]:
    """One row per pseudo-label round (quality, flip rate) and per training stage (best validation score)."""
    rounds, trainings = [], []
    for ref in pipeline.refs.values():
        d, layout = ref.path, ref.layout
        if is_done(layout.round):
            st = json.loads((layout.round / "stats.json").read_text())
            q = st.get("quality") or {}
            rounds.append({"round": d.name, "images": st["num_images"], "foreground_dice": q.get("foreground_dice"),
                           "miou": q.get("miou"), "flip_rate": st.get("flip_rate")})
        elif layout.best().exists():
            best = load_checkpoint(layout.best())
            trainings.append({"stage": d.name, f"best_val_{best.get('val_metric', 'metric')}": best.get("metric"),
                              "best_step": best.get("step")})
    return {"rounds": rounds, "trainings": trainings}


def add_diagnostics(pipeline: Pipeline, table: Callable[[], dict[str, Any]],
                    options: Sequence[str] = ()) -> StageRef | None:
    """In benchmark mode, a last stage writing ``table()`` to ``diagnostics.json`` (in the stage and the run
    directory; the api merges it into ``results.json``), and a ``generations`` table also as ``metrics.jsonl``
    rows. Never reused: it describes this run's stages. ``options``: the method options ``table`` reads.
    Outside benchmark mode, and for a method planned as another's teacher (a nested pipeline), nothing is added."""
    run = pipeline.run
    if not run.config.data.benchmark_gt or pipeline.parent is not None:
        return None

    def work(path: Path) -> None:
        if not run.dist.is_main:
            return
        doc = table()
        text = json.dumps(doc, indent=1, default=float)
        if isinstance(doc.get("generations"), list):
            atomic_write_text(StageLayout(path).metrics,
                              "".join(json.dumps(r, default=float) + "\n" for r in doc["generations"]))
        atomic_write_text(path / "diagnostics.json", text)
        atomic_write_text(run.run_dir / "diagnostics.json", text)

    return pipeline.add("diagnostics", work, options=options, reuse=False)
