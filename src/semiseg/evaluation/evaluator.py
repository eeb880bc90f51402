"""Evaluate a model: fast validation on cached working-size arrays, test at original resolution.

Metric definitions (absent classes, empty masks, ignore 255) live in :mod:`semiseg.evaluation.metrics`.
Foreground scores (per-image and pooled Dice/IoU) are computed when the class table names a
``foreground`` or is binary (then class 1). The **headline** metric is ``"dice"`` for such tasks —
the mean of subset means when the images carry subsets (the polyp paper's "Total"), otherwise the
per-image mean — and ``"miou"`` (absent classes excluded) for multi-class tasks.

The caller sets ``model.eval()``; evaluation runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from semiseg.data.classes import ClassTable
from semiseg.data.decode import read_image
from semiseg.data.prefetch import prefetch
from semiseg.data.transforms import to_input
from semiseg.data.types import DataSource
from semiseg.errors import DataError
from semiseg.evaluation.batched import BatchPredictor
from semiseg.evaluation.inference import SizeArg, predict_batch
from semiseg.evaluation.metrics import (
    ConfusionMatrix,
    ForegroundScores,
    confusion_matrices,
    iou_from_confusion,
    nanmean,
    summarize_sets,
)

Absent = Literal["exclude", "zero"]


def foreground_index(classes: ClassTable) -> int | None:
    """The class scored by per-image Dice/IoU: ``classes.foreground``, or 1 for a binary table."""
    if classes.foreground is not None:
        return classes.foreground
    return 1 if classes.is_binary else None


def headline_metric(classes: ClassTable) -> str:
    """``"dice"`` for tasks with a foreground class, ``"miou"`` otherwise (module docstring)."""
    return "dice" if foreground_index(classes) is not None else "miou"


def _clean(v: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN / inf to None."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    return v


@dataclass
class EvalResult:
    """Scores of one evaluation. Foreground fields are None for tasks without a foreground class.

    ``per_subset`` maps subset name to the same scores restricted to it; ``mean_of_subsets`` is the
    unweighted mean of those (None without subsets). ``per_image`` lists stem/subset/dice/iou/miou.
    ``void_images``: stems of images whose mask is void everywhere; they have no score, are left out of
    every mean and ``n_images``, and are counted (``n_void_images``) so that a reader sees them.
    """

    class_names: tuple[str, ...]
    confusion: np.ndarray
    miou: float
    per_class_iou: dict[str, float]
    per_class_dice: dict[str, float]
    pixel_accuracy: float
    n_images: int
    dice: float | None = None
    iou: float | None = None
    dice_pooled: float | None = None
    iou_pooled: float | None = None
    per_subset: dict[str, dict[str, Any]] = field(default_factory=dict)
    mean_of_subsets: dict[str, Any] | None = None
    per_image: list[dict[str, Any]] = field(default_factory=list)
    protocol: str | None = None
    void_images: list[str | None] = field(default_factory=list)

    @property
    def headline_metric(self) -> str:
        """``"dice"`` when foreground scores exist, else ``"miou"``."""
        return "dice" if self.dice is not None else "miou"

    def headline(self, metric: str | None = None) -> float:
        """The figure to select / report by: ``metric`` (default :attr:`headline_metric`), taken from
        ``mean_of_subsets`` when there are subsets, else from the whole set."""
        name = metric or self.headline_metric
        src = self.mean_of_subsets if self.mean_of_subsets else self.to_dict()
        value = src.get(name)
        if value is None and name not in src:
            raise KeyError(f"no metric {name!r} in this result (have {', '.join(sorted(src))})")
        return math.nan if value is None else float(value)

    def to_dict(self, per_image: bool = False) -> dict[str, Any]:
        """JSON-serialisable summary (NaN written as null); ``per_image=True`` adds the image records."""
        out: dict[str, Any] = {
            "miou": self.miou,
            "per_class_iou": self.per_class_iou,
            "per_class_dice": self.per_class_dice,
            "pixel_accuracy": self.pixel_accuracy,
            "dice": self.dice,
            "iou": self.iou,
            "dice_pooled": self.dice_pooled,
            "iou_pooled": self.iou_pooled,
            "per_subset": self.per_subset,
            "mean_of_subsets": self.mean_of_subsets,
            "n_images": self.n_images,
            "n_void_images": len(self.void_images),
            "void_images": self.void_images,
            "headline_metric": self.headline_metric,
            "confusion_matrix": self.confusion,
        }
        if self.protocol is not None:
            out["protocol"] = self.protocol
        if per_image:
            out["per_image"] = self.per_image
        return _clean(out)


class _Accumulator:
    """Per-image confusion matrices feed the global / per-subset matrices and the foreground scores."""

    def __init__(self, classes: ClassTable, absent: Absent) -> None:
        self.classes = classes
        self.absent = absent
        self.cm = ConfusionMatrix(classes.num_classes, classes.ignore_index)
        self.sub_cm: dict[str, ConfusionMatrix] = {}
        fg = foreground_index(classes)
        self.fg = None if fg is None else ForegroundScores(fg, classes.ignore_index)
        self.per_image: list[dict[str, Any]] = []
        self.void_images: list[str | None] = []
        self.any_subset = False

    def add(self, pred: torch.Tensor, target: torch.Tensor, stems: Sequence[str | None],
            subsets: Sequence[str | None]) -> None:
        c = self.classes.num_classes
        cms = confusion_matrices(pred, target, c, self.classes.ignore_index)
        self.cm.add_matrix(cms.sum(0))
        m = cms.cpu().numpy()
        scored = m.sum((1, 2)) > 0  # a void-only image has no score (not a perfect one): counted, left out
        self.void_images.extend(stem for stem, ok in zip(stems, scored, strict=True) if not ok)
        if not scored.all():
            m = m[scored]
            stems = [stem for stem, ok in zip(stems, scored, strict=True) if ok]
            subsets = [sub for sub, ok in zip(subsets, scored, strict=True) if ok]
        image_miou = iou_from_confusion(m)
        image_miou = (nanmean(image_miou, -1) if self.absent == "exclude"
                      else np.nan_to_num(image_miou, nan=0.0).mean(-1))
        for i, sub in enumerate(subsets):
            if sub is not None:
                self.any_subset = True
            key = sub if sub is not None else "unassigned"
            self.sub_cm.setdefault(key, ConfusionMatrix(c, self.classes.ignore_index)).add_matrix(m[i])
        n_before = 0
        if self.fg is not None:
            f = self.fg.foreground
            tp = m[:, f, f]
            self.fg.add_counts(tp, m[:, :, f].sum(-1) - tp, m[:, f, :].sum(-1) - tp, stems, subsets)
            n_before = len(self.fg.records) - len(m)
        for i in range(len(m)):
            rec = self.fg.records[n_before + i] if self.fg is not None else None
            self.per_image.append({"stem": stems[i], "subset": subsets[i],
                                   "dice": rec.dice if rec else None, "iou": rec.iou if rec else None,
                                   "miou": float(image_miou[i])})

    def _scores(self, cm: ConfusionMatrix) -> dict[str, Any]:
        names = self.classes.names
        return {"miou": cm.miou(self.absent), "pixel_accuracy": cm.pixel_accuracy(),
                "per_class_iou": dict(zip(names, cm.iou().tolist(), strict=True)),
                "per_class_dice": dict(zip(names, cm.dice().tolist(), strict=True))}

    def result(self, protocol: str | None) -> EvalResult:
        overall = self._scores(self.cm)
        fg = self.fg.summary() if self.fg is not None else {}
        per_subset: dict[str, dict[str, Any]] = {}
        mean_of_subsets = None
        if self.any_subset:
            fg_sub = self.fg.by_subset() if self.fg is not None else {}
            for name, cm in self.sub_cm.items():
                n = sum(1 for r in self.per_image if (r["subset"] or "unassigned") == name)
                per_subset[name] = {**self._scores(cm), **fg_sub.get(name, {}), "n_images": n}
            mean_of_subsets = summarize_sets(per_subset)["mean"]
        return EvalResult(
            class_names=tuple(self.classes.names), confusion=self.cm.matrix, miou=overall["miou"],
            per_class_iou=overall["per_class_iou"], per_class_dice=overall["per_class_dice"],
            pixel_accuracy=overall["pixel_accuracy"], n_images=len(self.per_image),
            dice=fg.get("dice"), iou=fg.get("iou"), dice_pooled=fg.get("dice_pooled"),
            iou_pooled=fg.get("iou_pooled"), per_subset=per_subset, mean_of_subsets=mean_of_subsets,
            per_image=self.per_image, protocol=protocol, void_images=self.void_images)


def _names(values: Sequence[str | None] | None, n: int, what: str) -> list[str | None]:
    if values is None:
        return [None] * n
    out = list(values)
    if len(out) != n:
        raise ValueError(f"{len(out)} {what} given for {n} images")
    return out


def evaluate_arrays(
    model: nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    classes: ClassTable,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    stems: Sequence[str] | None = None,
    subsets: Sequence[str | None] | None = None,
    absent: Absent = "exclude",
    amp: bool = False,
) -> EvalResult:
    """Validation on working-size arrays (``N×H×W×3`` uint8 images, ``N×H×W`` masks), in batches.

    Fast enough to run every few hundred training steps; scores are at the working size, not the
    original resolution (use :func:`evaluate_source` for test figures).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3]:
        raise ValueError(f"expected N×H×W×3 images and N×H×W masks, got {images.shape} and {masks.shape}")
    n = len(images)
    stem_list = _names(stems, n, "stems")
    subset_list = _names(subsets, n, "subsets")
    dev = torch.device(device)
    acc = _Accumulator(classes, absent)
    for i in range(0, n, max(1, batch_size)):
        j = min(n, i + max(1, batch_size))
        x = to_input(np.asarray(images[i:j])).to(dev)
        probs = predict_batch(model, x, amp=amp)
        if probs.shape[1] != classes.num_classes:
            raise ValueError(f"the model returns {probs.shape[1]} channels but the task has "
                             f"{classes.num_classes} classes")
        target = torch.from_numpy(np.array(masks[i:j], dtype=np.uint8)).to(dev)
        acc.add(probs.argmax(1), target, stem_list[i:j], subset_list[i:j])
    return acc.result(None)


def evaluate_source(
    model: nn.Module,
    source: DataSource,
    stems: Sequence[str],
    *,
    protocol: str = "resize",
    size: SizeArg | None = None,
    window: SizeArg | None = None,
    stride: SizeArg | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    absent: Absent = "exclude",
    pad_mode: str = "reflect",
    size_divisor: int = 32,
    amp: bool = False,
    batch_size: int = 8,
) -> EvalResult:
    """Test evaluation at ORIGINAL resolution: files read with ``read_image`` / ``source.decode_mask``.

    Per-subset scores and their mean are reported when the samples carry ``subset`` (e.g. kvasir-seg /
    cvc-clinicdb). Pixels a protocol does not predict (outside a centre crop) are not scored.
    ``progress(done, total)`` is called after each image. ``batch_size`` images go through the model
    together (:class:`~semiseg.evaluation.batched.BatchPredictor`; 1 gives the one-at-a-time loop).
    """
    by_stem = source.by_stem()
    samples = []
    for stem in stems:
        sample = by_stem.get(stem)
        if sample is None:
            raise DataError(f"source {source.name!r}: no sample with stem {stem!r} to evaluate")
        if sample.mask is None:
            raise DataError(f"source {source.name!r}: sample {stem!r} has no mask to evaluate against")
        samples.append(sample)
    dev = torch.device(device)
    classes = source.classes
    acc = _Accumulator(classes, absent)
    predictor = BatchPredictor(model, protocol=protocol, size=size, window=window, stride=stride,
                               num_classes=classes.num_classes, device=dev, batch_size=batch_size,
                               size_divisor=size_divisor, pad_mode=pad_mode, amp=amp)

    def load(sample: Any) -> tuple[np.ndarray, np.ndarray | None, tuple[Any, np.ndarray]]:
        image = read_image(sample.image)
        mask = source.decode_mask(sample.mask)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{sample.mask}: mask is {mask.shape[1]}×{mask.shape[0]} but image "
                            f"{sample.image} is {image.shape[1]}×{image.shape[0]}")
        return image, predictor.prepare(image), (sample, mask)

    # decoding runs ahead on threads while the model works on the previous batch
    for k, ((sample, mask), pred) in enumerate(predictor.run(prefetch(load, samples, depth=2 * batch_size))):
        target = torch.from_numpy(np.array(mask, dtype=np.uint8)).to(dev)
        if pred.valid is not None:
            target[~pred.valid] = classes.ignore_index
        acc.add(pred.labels().unsqueeze(0), target.unsqueeze(0), [sample.stem], [sample.subset])
        if progress is not None:
            progress(k + 1, len(samples))
    return acc.result(protocol)
