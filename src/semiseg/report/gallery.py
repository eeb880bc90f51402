"""Test-image galleries: choose best / median / worst cases, predict them, turn them into thumbnails.

Predictions use the run's own inference protocol at original resolution (as the test metrics do);
everything is downscaled to the thumbnail size before colouring and encoding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from semiseg.data.classes import IGNORE_INDEX, ClassTable
from semiseg.data.decode import read_image
from semiseg.data.types import DataSource
from semiseg.evaluation.metrics import ConfusionMatrix, ForegroundScores
from semiseg.report import figures


@dataclass
class Case:
    """A test image chosen for the gallery, with its score and why it was chosen."""

    stem: str
    subset: str | None
    score: float | None
    tag: str


@dataclass
class ImagePrediction:
    """One image at original resolution: ``pred`` is 255 where the protocol predicts nothing."""

    stem: str
    image: np.ndarray
    gt: np.ndarray | None
    pred: np.ndarray
    confidence: np.ndarray


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` torch CPU threads inside the block (None: leave as is), then restore the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score_of(record: dict[str, Any], metric: str) -> float | None:
    value = record.get(metric)
    if value is None and metric != "miou":
        value = record.get("miou")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def pick_cases(per_image: Sequence[dict[str, Any]], metric: str, n: int) -> list[Case]:
    """Up to ``n`` images: the worst, median and best thirds by ``metric`` (ties broken by stem).

    With ``n`` or fewer scored images every one is shown. Returned best first, then median, then worst.
    """
    scored = [(s, r) for r in per_image if (s := score_of(r, metric)) is not None]
    scored.sort(key=lambda x: (x[0], str(x[1].get("stem"))))
    if n <= 0 or not scored:
        return []

    def case(i: int, tag: str) -> Case:
        s, r = scored[i]
        return Case(str(r["stem"]), r.get("subset"), s, tag)

    total = len(scored)
    if total <= n:
        third = total / 3
        return [case(i, "best" if i >= 2 * third else "median" if i >= third else "worst")
                for i in reversed(range(total))]
    k_low = n // 3
    k_high = n // 3
    k_mid = n - k_low - k_high
    start = max(k_low, min(total - k_high - k_mid, total // 2 - k_mid // 2))
    best = [case(i, "best") for i in reversed(range(total - k_high, total))]
    median = [case(i, "median") for i in reversed(range(start, start + k_mid))]
    worst = [case(i, "worst") for i in reversed(range(k_low))]
    return best + median + worst


def predict_stem(model: torch.nn.Module, source: DataSource, stem: str, config: Any,
                 device: torch.device | str = "cpu") -> ImagePrediction:
    """Predict one image of ``source`` with the run's protocol (``config`` is its RunConfig)."""
    from semiseg.evaluation.inference import predict_probs

    sample = source.by_stem()[stem]
    image = read_image(sample.image)
    gt = source.decode_mask(sample.mask) if sample.mask is not None else None
    pred = predict_probs(model, image, protocol=config.eval.protocol, size=tuple(config.data.size),
                         window=config.eval.window, stride=config.eval.stride,
                         num_classes=source.classes.num_classes, device=device)
    probs = pred.probs.float()
    conf, label = probs.max(0)
    label_np = label.cpu().numpy().astype(np.uint8)
    conf_np = conf.cpu().numpy().astype(np.float32)
    if pred.valid is not None:
        valid = pred.valid.cpu().numpy()
        label_np[~valid] = IGNORE_INDEX
        conf_np[~valid] = 0.0
    return ImagePrediction(stem, image, gt, label_np, conf_np)


def _prepare(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target = gt.copy()
    target[pred == IGNORE_INDEX] = IGNORE_INDEX  # unpredicted pixels are not scored (centre crop)
    return np.where(pred == IGNORE_INDEX, 0, pred).astype(np.uint8), target


def _foreground(classes: ClassTable) -> int | None:
    return classes.foreground if classes.foreground is not None else (1 if classes.is_binary else None)


def image_score(pred: np.ndarray, gt: np.ndarray, classes: ClassTable) -> tuple[str, float]:
    """The per-image score the evaluator reports for this task: foreground Dice, else image mIoU."""
    p, target = _prepare(pred, gt)
    fg = _foreground(classes)
    if fg is not None:
        scores = ForegroundScores(fg, classes.ignore_index)
        scores.update(p, target)
        return "dice", scores.records[0].dice
    cm = ConfusionMatrix(classes.num_classes, classes.ignore_index)
    cm.update(p, target)
    return "miou", cm.miou()


class Scorer:
    """Per-image scores of a test pass, and the headline they add up to (as the evaluator defines it:
    mean of subset means of per-image Dice, or mIoU of the pooled confusion matrix per subset)."""

    def __init__(self, classes: ClassTable) -> None:
        self.classes = classes
        self.metric = "dice" if _foreground(classes) is not None else "miou"
        self.records: list[dict[str, Any]] = []
        self._cms: dict[str | None, ConfusionMatrix] = {}

    def add(self, stem: str, subset: str | None, pred: np.ndarray, gt: np.ndarray) -> float:
        metric, score = image_score(pred, gt, self.classes)
        self.records.append({"stem": stem, "subset": subset, metric: score})
        if self.metric == "miou":
            p, target = _prepare(pred, gt)
            cm = self._cms.setdefault(subset, ConfusionMatrix(self.classes.num_classes, self.classes.ignore_index))
            cm.update(p, target)
        return score

    def headline(self) -> float:
        subsets = {r["subset"] for r in self.records}
        if self.metric == "miou":
            values = [cm.miou() for cm in self._cms.values()]
            if len(values) > 1 or None not in subsets:
                return float(np.mean(values))
            return values[0] if values else math.nan
        groups: dict[str | None, list[float]] = {}
        for r in self.records:
            groups.setdefault(r["subset"], []).append(r["dice"])
        if subsets == {None}:
            return float(np.mean(groups[None]))
        return float(np.mean([np.mean(v) for v in groups.values()])) if groups else math.nan


def shrink(p: ImagePrediction, max_px: int) -> ImagePrediction:
    """The same prediction at thumbnail size (so a whole test set fits in memory for the gallery)."""
    size = figures.thumb_size(p.image.shape, max_px)
    return ImagePrediction(p.stem, figures.resize(p.image, size),
                           None if p.gt is None else figures.resize(p.gt, size, nearest=True),
                           figures.resize(p.pred, size, nearest=True), figures.resize(p.confidence, size))


def thumbs(p: ImagePrediction, classes: ClassTable, max_px: int, quality: int = 82) -> dict[str, str]:
    """Data URIs of the thumbnails of one prediction: image, gt, pred, errors, confidence."""
    size = figures.thumb_size(p.image.shape, max_px)
    image = figures.resize(p.image, size)
    pred = figures.resize(p.pred, size, nearest=True)
    conf = figures.resize(p.confidence, size)
    out = {"image": figures.encode_image(image, quality=quality),
           "pred": figures.encode_image(figures.overlay(image, pred, classes), quality=quality),
           "confidence": figures.encode_image(figures.confidence_map(image, conf, classes.num_classes),
                                              quality=quality)}
    if p.gt is not None:
        gt = figures.resize(p.gt, size, nearest=True)
        out["gt"] = figures.encode_image(figures.overlay(image, gt, classes), quality=quality)
        out["errors"] = figures.encode_image(figures.error_map(image, pred, gt, classes), quality=quality)
    return out


def pseudo_thumbs(image: np.ndarray, label: np.ndarray, confidence: np.ndarray, classes: ClassTable,
                  max_px: int, gt: np.ndarray | None = None, quality: int = 82) -> dict[str, str]:
    """Thumbnails of a pseudo label (grey = not selected) and its confidence, at the label's geometry."""
    shape = label.shape
    if image.shape[:2] != shape:
        image = figures.resize(image, shape)
    size = figures.thumb_size(shape, max_px)
    img = figures.resize(image, size)
    small = figures.resize(label, size, nearest=True)
    conf = figures.resize(confidence, size)
    out = {"image": figures.encode_image(img, quality=quality),
           "pseudo": figures.encode_image(figures.overlay(img, small, classes), quality=quality),
           "confidence": figures.encode_image(figures.confidence_map(img, conf, classes.num_classes),
                                              quality=quality)}
    if gt is not None:
        gt_small = figures.resize(gt, size, nearest=True)
        out["gt"] = figures.encode_image(figures.overlay(img, gt_small, classes), quality=quality)
    return out
