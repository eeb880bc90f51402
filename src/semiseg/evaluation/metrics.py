"""Segmentation metrics, defined once: confusion matrix (IoU, mIoU, Dice, accuracy) and foreground Dice/IoU.

Conventions:

- Pixels whose **target** is ``ignore_index`` (255) are never scored, whatever the prediction there.
- Confusion matrices have **rows = truth, columns = prediction**, dtype int64.
- **Absent classes**: a class that appears neither in the truth nor in the prediction has IoU/Dice NaN.
  ``miou(absent="exclude")`` (default) averages over the other classes (``np.nanmean``, as ST++ does);
  ``miou(absent="zero")`` counts such a class as 0, the ``intersection / (union + 1e-10)`` convention of
  GTA-Seg / UniMatch (identical up to ``1e-10 / union``).
- **Void-only images**: an image whose target is ``ignore_index`` everywhere has no score at all (it is not
  "empty and predicted empty"): it is left out of every per-image mean and counted (``n_void_images``).
- **Empty-mask rule** for foreground scores: when truth and prediction are both empty (no foreground
  pixel, e.g. a frame without a polyp predicted as such) Dice = IoU = 1; when exactly one of them is
  empty, Dice = IoU = 0 (this is what the formulas give anyway). Matches ``smp.metrics`` with
  ``zero_division=1``. The pooled (global) scores use the same rule on the summed counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from semiseg.data.classes import IGNORE_INDEX

ArrayLike = torch.Tensor | np.ndarray
_TORCH_FROM_NUMPY = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.bool_)}


def as_label_tensor(x: ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    """An integer label map as a torch tensor (numpy is wrapped without a copy when possible)."""
    if isinstance(x, np.ndarray):
        if x.dtype not in _TORCH_FROM_NUMPY:
            if not np.issubdtype(x.dtype, np.integer):
                raise TypeError(f"label maps must hold integers, got numpy dtype {x.dtype}")
            x = x.astype(np.int64)
        if not x.flags.writeable or not x.flags.c_contiguous:
            x = np.array(x, copy=True, order="C")
        x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch tensor or numpy array, got {type(x).__name__}")
    if torch.is_floating_point(x) or torch.is_complex(x):
        raise TypeError(f"label maps must hold integers (argmax the probabilities first), got {x.dtype}")
    return x if device is None else x.to(device)


def confusion_matrices(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-image confusion matrices ``B×C×C`` (int64, rows = truth) of label maps shaped ``B×...``.

    One ``bincount`` on the device of ``pred`` for the whole batch, so per-image and global scores
    come from a single pass. Raises ``ValueError`` on a label outside ``0..C-1`` that is not ignored.
    """
    p = as_label_tensor(pred)
    t = as_label_tensor(target, p.device)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    if p.dim() < 1:
        raise ValueError("label maps need at least one dimension (the batch)")
    b, c = p.shape[0], num_classes
    p = p.reshape(b, -1).long()
    t = t.reshape(b, -1).long()
    keep = t != ignore_index
    for name, lab in (("target", t), ("prediction", p)):
        bad = keep & ((lab < 0) | (lab >= c))
        if bool(bad.any()):
            value = int(lab[bad][0])
            raise ValueError(f"{name} holds label {value}: not in 0..{c - 1} nor {ignore_index} (ignore)")
    offset = torch.arange(b, device=p.device).unsqueeze(1) * (c * c)
    idx = (offset + t * c + p)[keep]
    return torch.bincount(idx, minlength=b * c * c).reshape(b, c, c)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def iou_from_confusion(m: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)`` of ``...×C×C`` matrices; NaN for a class absent from both."""
    m = np.asarray(m, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    return _ratio(tp, m.sum(-1) + m.sum(-2) - tp)


def dice_from_confusion(m: np.ndarray) -> np.ndarray:
    """Per-class Dice ``2TP / (2TP + FP + FN)``; NaN where a class is absent from both."""
    m = np.asarray(m, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    return _ratio(2 * tp, m.sum(-1) + m.sum(-2))


def nanmean(x: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """``np.nanmean`` without the warning: NaN when every entry along ``axis`` is NaN."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    n = ok.sum(axis)
    s = np.where(ok, x, 0.0).sum(axis)
    out = _ratio(s, n)
    return float(out) if out.ndim == 0 else out


def mean_iou(m: np.ndarray, absent: Literal["exclude", "zero"] = "exclude") -> np.ndarray | float:
    """mIoU of ``...×C×C`` matrices under the absent-class rule (see the module docstring)."""
    iou = iou_from_confusion(m)
    if absent == "exclude":
        return nanmean(iou, -1)
    if absent == "zero":
        out = np.nan_to_num(iou, nan=0.0).mean(-1)
        return float(out) if np.ndim(out) == 0 else out
    raise ValueError(f"absent must be 'exclude' or 'zero', got {absent!r}")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ConfusionMatrix:
    """Accumulates a ``C×C`` confusion matrix (rows = truth) over batches, images or ranks.

    The running matrix lives on the device of the first update, so updates on CUDA do not synchronise.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._m: torch.Tensor | None = None

    def reset(self) -> None:
        self._m = None

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add label maps of any (equal) shape; pixels with ``target == ignore_index`` are skipped."""
        p = as_label_tensor(pred)
        self.add_matrix(confusion_matrices(p.reshape(1, -1), as_label_tensor(target).reshape(1, -1),
                                           self.num_classes, self.ignore_index)[0])

    def add_matrix(self, m: ArrayLike) -> None:
        """Add a ``C×C`` count matrix (or a stack ``B×C×C``, summed)."""
        t = torch.as_tensor(m).long()
        if t.dim() == 3:
            t = t.sum(0)
        if t.shape != (self.num_classes, self.num_classes):
            raise ValueError(f"expected a {self.num_classes}x{self.num_classes} matrix, got {tuple(t.shape)}")
        self._m = t.clone() if self._m is None else self._m + t.to(self._m.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts into this one (returns self)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        if other._m is not None:
            self.add_matrix(other._m)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over DDP ranks (every rank must call it); a no-op without torch.distributed."""
        if not _dist_ready():
            return self
        dist = torch.distributed
        local = self._m if self._m is not None else torch.zeros(self.num_classes, self.num_classes,
                                                                dtype=torch.int64)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        buf = local.to(device).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self._m = buf.to(local.device)
        return self

    @property
    def matrix(self) -> np.ndarray:
        """The counts as an int64 numpy array ``C×C`` (rows = truth, columns = prediction)."""
        if self._m is None:
            return np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        return self._m.detach().cpu().numpy().astype(np.int64)

    @property
    def total(self) -> int:
        """Number of scored (non-ignored) pixels."""
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class absent from both prediction and truth."""
        return iou_from_confusion(self.matrix)

    def dice(self) -> np.ndarray:
        """Per-class Dice (F1); NaN for a class absent from both prediction and truth."""
        return dice_from_confusion(self.matrix)

    def miou(self, absent: Literal["exclude", "zero"] = "exclude") -> float:
        """Mean IoU over classes; ``absent`` chooses the rule for classes absent from both (module doc)."""
        return float(mean_iou(self.matrix, absent))

    def pixel_accuracy(self) -> float:
        """Correct / scored pixels (NaN when nothing was scored)."""
        m = self.matrix
        total = m.sum()
        return float(np.trace(m) / total) if total > 0 else math.nan


def dice_score(tp: int, fp: int, fn: int) -> float:
    """Foreground Dice with the empty-mask rule (both empty -> 1)."""
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2.0 * tp / den


def iou_score(tp: int, fp: int, fn: int) -> float:
    """Foreground IoU with the empty-mask rule (both empty -> 1)."""
    den = tp + fp + fn
    return 1.0 if den == 0 else tp / den


@dataclass(frozen=True)
class ImageScore:
    """Foreground scores of one image, kept for galleries (best / worst cases) and per-subset means."""

    stem: str | None
    subset: str | None
    dice: float
    iou: float
    tp: int
    fp: int
    fn: int


def _names(values: str | Sequence[str | None] | None, n: int, what: str) -> list[str | None]:
    if values is None:
        return [None] * n
    if isinstance(values, str):
        values = [values]
    out = list(values)
    if len(out) != n:
        raise ValueError(f"{len(out)} {what} given for {n} images")
    return out


class ForegroundScores:
    """Per-image and pooled Dice/IoU of one foreground class (binary tasks, e.g. polyp or vessel).

    Per-image scores are averaged over images (the polyp paper's ``micro-imagewise`` reduction); pooled
    scores come from TP/FP/FN summed over all images. Empty-mask rule: truth and prediction both empty
    -> Dice = IoU = 1; exactly one empty -> 0. Pixels with target == ``ignore_index`` are not scored.
    """

    def __init__(self, foreground: int = 1, ignore_index: int = IGNORE_INDEX) -> None:
        self.foreground = foreground
        self.ignore_index = ignore_index
        self.records: list[ImageScore] = []
        self.void: list[str | None] = []  # stems of images without a scored pixel (left out of the means)

    def update(self, pred: ArrayLike, target: ArrayLike, stems: str | Sequence[str | None] | None = None,
               subsets: str | Sequence[str | None] | None = None) -> None:
        """Score label maps: ``H×W`` is one image, ``B×H×W`` (or ``B×...``) a batch of images."""
        p = as_label_tensor(pred)
        t = as_label_tensor(target, p.device)
        if p.shape != t.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
        if p.dim() == 2:
            p, t = p.unsqueeze(0), t.unsqueeze(0)
        p, t = p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1)
        pf = (p == self.foreground) & (t != self.ignore_index)
        tf = t == self.foreground
        tp = (pf & tf).sum(1)
        fp = (pf & ~tf).sum(1)
        fn = (~pf & tf).sum(1)
        self.add_counts(tp, fp, fn, stems, subsets, scored=(t != self.ignore_index).sum(1))

    def add_counts(self, tp: ArrayLike | Sequence[int], fp: ArrayLike | Sequence[int],
                   fn: ArrayLike | Sequence[int], stems: str | Sequence[str | None] | None = None,
                   subsets: str | Sequence[str | None] | None = None,
                   scored: ArrayLike | Sequence[int] | None = None) -> None:
        """Add per-image foreground counts (e.g. read off per-image confusion matrices). ``scored``: the number
        of non-ignored pixels per image; an image with none is counted in :attr:`void`, not scored."""
        counts = [np.asarray(torch.as_tensor(v).cpu(), dtype=np.int64).reshape(-1).tolist()
                  for v in (tp, fp, fn)]
        n = len(counts[0])
        if len(counts[1]) != n or len(counts[2]) != n:
            raise ValueError("tp, fp and fn must have one entry per image")
        valid = [1] * n if scored is None else np.asarray(torch.as_tensor(scored).cpu()).reshape(-1).tolist()
        for stem, subset, a, b, c, v in zip(_names(stems, n, "stems"), _names(subsets, n, "subsets"), *counts,
                                            valid, strict=True):
            if v == 0:
                self.void.append(stem)
                continue
            self.records.append(ImageScore(stem, subset, dice_score(a, b, c), iou_score(a, b, c), a, b, c))

    def merge(self, other: ForegroundScores) -> ForegroundScores:
        """Append another accumulator's images (returns self)."""
        self.records.extend(other.records)
        self.void.extend(other.void)
        return self

    def all_gather(self) -> ForegroundScores:
        """Collect every DDP rank's per-image records on every rank; a no-op without torch.distributed."""
        if _dist_ready():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, ([asdict(r) for r in self.records], self.void))
            self.records = [ImageScore(**r) for records, _ in parts for r in records]
            self.void = [stem for _, void in parts for stem in void]
        return self

    @staticmethod
    def summarize(records: Sequence[ImageScore]) -> dict[str, float | int]:
        """Per-image means and pooled scores of ``records`` (NaN means when there are none)."""
        n = len(records)
        tp = sum(r.tp for r in records)
        fp = sum(r.fp for r in records)
        fn = sum(r.fn for r in records)
        return {
            "dice": sum(r.dice for r in records) / n if n else math.nan,
            "iou": sum(r.iou for r in records) / n if n else math.nan,
            "dice_pooled": dice_score(tp, fp, fn) if n else math.nan,
            "iou_pooled": iou_score(tp, fp, fn) if n else math.nan,
            "n_images": n,
        }

    def summary(self) -> dict[str, float | int]:
        """dice / iou (per-image means), dice_pooled / iou_pooled, n_images over the scored images, and
        n_void_images (images without a scored pixel, left out)."""
        return {**self.summarize(self.records), "n_void_images": len(self.void)}

    def by_subset(self) -> dict[str, dict[str, float | int]]:
        """The same summary per subset (records without a subset are grouped under ``"unassigned"``)."""
        groups: dict[str, list[ImageScore]] = {}
        for r in self.records:
            groups.setdefault(r.subset if r.subset is not None else "unassigned", []).append(r)
        return {name: self.summarize(recs) for name, recs in groups.items()}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _mean_of(values: list[Any]) -> Any:
    """Unweighted mean skipping NaN/None (NaN when nothing is left); None for non-numeric values."""
    if values and all(isinstance(v, Mapping) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        nested = {k: _mean_of([v[k] for v in values if k in v]) for k in keys}
        return {k: v for k, v in nested.items() if v is not None}
    if not all(_is_number(v) or v is None for v in values):
        return None
    nums = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(nums) / len(nums) if nums else math.nan


def summarize_sets(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per test set and the **mean of set means** (the polyp paper's "Total") of every metric present.

    Returns ``{"per_set": {...}, "mean": {...}}``. Each numeric metric (nested dicts such as
    ``per_class_iou`` too) is averaged over the sets that define it, unweighted, skipping NaN / None
    (a set where the metric is undefined does not count). Counts whose name starts with ``n_`` are
    summed instead of averaged.
    """
    per_set = {name: dict(r) for name, r in results.items()}
    keys = dict.fromkeys(k for r in per_set.values() for k in r)
    mean: dict[str, Any] = {}
    for k in keys:
        values = [r[k] for r in per_set.values() if k in r]
        if k.startswith("n_") and all(_is_number(v) for v in values):
            mean[k] = int(sum(values))
            continue
        m = _mean_of(values)
        if m is not None:
            mean[k] = m
    return {"per_set": per_set, "mean": mean}
