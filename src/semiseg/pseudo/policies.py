"""Selection policies: softmax probabilities -> (pseudo label with 255 for unselected, confidence).

A policy is called on ``C×H×W`` or ``B×C×H×W`` probabilities (numpy or torch) and returns a uint8 label
map and the float32 confidence (the maximum probability, whatever the rule) of the same leading shape.
Policies that need a look at the whole unlabeled set first (class-balanced thresholds, a set-wide
percentile) have ``needs_fit = True``: call ``fit(iterable of probability arrays)`` once, then apply.
``name`` and ``params()`` go into the pseudo-label store's provenance.

Online methods (FixMatch, UniMatch, mean teacher) select on the device, inside the training step: policies whose
rule needs no look at the whole set (``online = True``) also offer :meth:`Policy.on_tensor`, which takes
``B×C×H×W`` torch probabilities and returns a long label (255 = unselected) and the confidence, on the same device.

ST++'s image-level reliability (``stability_scores`` / ``split_reliable``) is here too: it selects whole
images, not pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from semiseg.data.classes import IGNORE_INDEX


def _as_numpy(probs: Any) -> np.ndarray:
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().float().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim not in (3, 4):
        raise ValueError(f"probabilities must be C×H×W or B×C×H×W, got shape {probs.shape}")
    if probs.shape[-3] > IGNORE_INDEX:
        raise ValueError(f"{probs.shape[-3]} classes do not fit a uint8 label with 255 = ignore")
    return probs


def _argmax_conf(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax (uint8) and max probability (float32) over the class axis (-3)."""
    return probs.argmax(axis=-3).astype(np.uint8), probs.max(axis=-3).astype(np.float32)


class Policy:
    """Base: ``__call__(probs) -> (label, confidence)``; ``fit`` is a no-op unless ``needs_fit``."""

    name = "policy"
    needs_fit = False
    online = False

    def fit(self, prob_batches: Iterable[Any]) -> Policy:
        return self

    def params(self) -> dict[str, Any]:
        return {}

    def select(self, label: np.ndarray, conf: np.ndarray, probs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, probs: Any) -> tuple[np.ndarray, np.ndarray]:
        p = _as_numpy(probs)
        label, conf = _argmax_conf(p)
        return self.select(label, conf, p), conf

    def on_tensor(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(label, confidence)`` of torch probabilities, on their device: the label is long (argmax, 255 where
        unselected), what a loss takes directly. Only for ``online`` policies (no set-wide statistics)."""
        if not self.online:
            raise TypeError(f"policy {self.name!r} needs the whole set; it cannot select inside a training step")
        conf, label = probs.detach().float().max(dim=-3)
        return self.select(label, conf, probs), conf  # type: ignore[arg-type]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"


class SelectAll(Policy):
    """Hard argmax everywhere, no threshold: ST / ST++'s pseudo labels."""

    name = "all"
    online = True

    def select(self, label: np.ndarray, conf: np.ndarray, probs: np.ndarray) -> np.ndarray:
        return label


class FixedThreshold(Policy):
    """Argmax kept where the max probability is ``>= threshold`` (FixMatch / UniMatch style)."""

    name = "threshold"
    online = True

    def __init__(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def select(self, label: Any, conf: Any, probs: Any) -> Any:
        if isinstance(label, torch.Tensor):  # online: long labels on the probabilities' device
            return label.masked_fill(conf < self.threshold, IGNORE_INDEX)
        return np.where(conf >= self.threshold, label, IGNORE_INDEX).astype(np.uint8)


class ClassRelativeThreshold(FixedThreshold):
    """Class-wise thresholds scaled by how much of the batch each class holds: a pixel predicted as c is kept
    where its max probability is ``>= threshold · p̄_c / max_k p̄_k``, ``p̄_c`` the mean probability of class c
    over the call's pixels.

    FreeMatch's self-adaptive local threshold (Wang et al., ICLR 2023, Eq. 6-8: "MaxNorm" of the classes' mean
    probabilities) with a fixed global ``threshold``, taken over each call's batch instead of an EMA, so it holds
    no state and a resumed run selects what an unbroken one did. The majority class keeps ``threshold``; a class
    that fills a tenth of the pixels needs a tenth of it, so a rare class is not thresholded away while the
    network learns it. Tried against FixMatch's collapse to confident background on polyp: it slows the collapse
    but does not stop it (polyp-notes.md).
    """

    name = "class_relative"

    def class_thresholds(self, probs: Any) -> Any:
        """``threshold · p̄_c / max p̄``, one per class (numpy or torch alike)."""
        axes = tuple(d for d in range(probs.ndim) if d != probs.ndim - 3)
        mean = probs.float().mean(dim=axes) if isinstance(probs, torch.Tensor) else probs.mean(axis=axes)
        return self.threshold * mean / mean.max().clip(min=1e-12)

    def select(self, label: Any, conf: Any, probs: Any) -> Any:
        per_pixel = self.class_thresholds(probs)[label.long() if isinstance(label, torch.Tensor) else label]
        if isinstance(label, torch.Tensor):
            return label.masked_fill(conf < per_pixel, IGNORE_INDEX)
        return np.where(conf >= per_pixel, label, IGNORE_INDEX).astype(np.uint8)


ONLINE_THRESHOLDS: dict[str, type[FixedThreshold]] = {
    FixedThreshold.name: FixedThreshold, ClassRelativeThreshold.name: ClassRelativeThreshold}


def percentile_linear(values: torch.Tensor, percent: float) -> torch.Tensor:
    """``np.percentile(values, percent)`` (linear), for any size (``torch.quantile`` caps at 2^24)."""
    flat = values.flatten()
    if flat.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    ordered = torch.sort(flat.double()).values
    pos = (flat.numel() - 1) * (percent / 100.0)
    lo = int(pos // 1)
    hi = min(lo + 1, flat.numel() - 1)
    frac = pos - lo
    return (ordered[lo] + (ordered[hi] - ordered[lo]) * frac).to(values.dtype)


class DropLowest(Policy):
    """GTA-Seg's rule: drop pixels whose confidence is ``<=`` the ``percent`` percentile.

    Without ``fit`` the percentile is taken over each call's batch (GTA's per-batch rule, online: inside the
    training step, over the pixels not already ignored); after ``fit`` it is one threshold from every
    ``sample_stride``-th pixel of the whole set, so offline labels do not depend on how images were batched.
    """

    name = "drop_lowest"
    online = True

    def __init__(self, percent: float = 20.0, sample_stride: int = 1) -> None:
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"percent must be in [0, 100], got {percent}")
        self.percent = float(percent)
        self.sample_stride = int(sample_stride)
        self.threshold: float | None = None

    def fit(self, prob_batches: Iterable[Any]) -> DropLowest:
        samples = [_argmax_conf(_as_numpy(p))[1].ravel()[:: self.sample_stride] for p in prob_batches]
        self.threshold = float(np.percentile(np.concatenate(samples), self.percent)) if samples else None
        return self

    def params(self) -> dict[str, Any]:
        return {"percent": self.percent, "sample_stride": self.sample_stride, "threshold": self.threshold}

    def dropped(self, conf: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Online: the ``valid`` pixels at or below the percentile of the valid pixels' confidence."""
        thresh = self.threshold if self.threshold is not None else percentile_linear(conf[valid], self.percent)
        return (conf <= thresh) & valid

    def select(self, label: Any, conf: Any, probs: Any) -> Any:
        if isinstance(label, torch.Tensor):
            return label.masked_fill(self.dropped(conf, label != IGNORE_INDEX), IGNORE_INDEX)
        thresh = self.threshold if self.threshold is not None else float(np.percentile(conf, self.percent))
        return np.where(conf <= thresh, IGNORE_INDEX, label).astype(np.uint8)


class ConfidenceWeights:
    """GTA-Seg's re-weighting of the kept pseudo labels by a teacher's confidence ``c`` (a weighting policy:
    it weighs what a selection policy kept).

    Released code (``tau=None``): weight ``c + 1`` on every pixel of the batch, with ``c = 0`` on dropped
    pixels (they add 1 to the normaliser) and the teacher's ``c`` kept on pixels already ignored
    (``ignored_count_as_dropped``: 0 there too). Paper Eq. 6-7 (``tau`` a float, τ = 1 in the paper: a
    Laplace-smoothing constant, not a temperature): ``c + τ`` on the kept pixels only.
    """

    name = "confidence_weights"

    def __init__(self, tau: float | None = None, *, ignored_count_as_dropped: bool = False) -> None:
        self.tau, self.ignored_count_as_dropped = tau, ignored_count_as_dropped

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau, "ignored_count_as_dropped": self.ignored_count_as_dropped}

    def __call__(self, conf: torch.Tensor, dropped: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        conf = torch.where(dropped, torch.zeros_like(conf), conf)
        if self.ignored_count_as_dropped:
            conf = torch.where(valid, conf, torch.zeros_like(conf))
        if self.tau is None:
            return conf + 1.0
        return (conf + self.tau) * (valid & ~dropped).to(conf.dtype)


class ClassBalanced(Policy):
    """DST-CBC's class-balanced curriculum (CBC, after CRST): per-class confidence thresholds ``k_c``.

    ``fit`` flattens each array it is given (a batch, as the ``dst-cbc`` branch does, or one image, as the
    ``scale`` branch does), keeps every ``sample_stride``-th pixel's (argmax, max prob), and sets
    ``k_c = sorted_c[-int(n_c * ratio) - 1]``, the ``(1 - ratio)`` quantile of class c's confidences, so
    about ``ratio`` of each class is selected; ``ratio >= 1`` gives ``k_c = 1e-4`` for every class (all
    equal, so every pixel gets its raw argmax). Below 1, a class with fewer than ``min_count`` samples
    (the released code crashes on an empty one) gets ``empty_threshold`` (default just above 1: none of
    its pixels is selected; 0 would take them all).

    ``rule="legacy"`` (released ``dst-cbc`` branch): label = argmax of ``p / k``, 255 where
    ``max(p / k) < 1`` (it can differ from the raw argmax, kept for CRST parity).
    ``rule="threshold"`` (the ``scale`` branch): raw argmax kept where ``p_max >= k_argmax``.
    """

    name = "class_balanced"
    needs_fit = True

    def __init__(
        self,
        ratio: float,
        sample_stride: int = 16,
        rule: Literal["legacy", "threshold"] = "legacy",
        min_count: int = 1,
        empty_threshold: float = 1.0 + 1e-6,
        num_classes: int | None = None,
    ) -> None:
        if ratio <= 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        if rule not in ("legacy", "threshold"):
            raise ValueError(f"rule must be 'legacy' or 'threshold', got {rule!r}")
        self.ratio = float(ratio)
        self.sample_stride = int(sample_stride)
        self.rule = rule
        self.min_count = max(1, int(min_count))
        self.empty_threshold = float(empty_threshold)
        self.num_classes = num_classes
        self.thresholds: np.ndarray | None = None
        self.sample_counts: list[int] | None = None

    def fit(self, prob_batches: Iterable[Any]) -> ClassBalanced:
        per_class: list[list[np.ndarray]] | None = None
        for probs in prob_batches:
            p = _as_numpy(probs)
            if per_class is None:
                c = self.num_classes or p.shape[-3]
                per_class = [[] for _ in range(c)]
            label, conf = _argmax_conf(p)
            label, conf = label.ravel()[:: self.sample_stride], conf.ravel()[:: self.sample_stride]
            for k in range(len(per_class)):
                per_class[k].append(conf[label == k])
        if per_class is None:
            raise ValueError("ClassBalanced.fit got no probabilities")
        self.thresholds, self.sample_counts = self.thresholds_from_samples(
            [np.concatenate(v) for v in per_class]
        )
        return self

    def thresholds_from_samples(self, samples: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """``k_c`` from each class's sampled max probabilities (the quantile rule, no sampling)."""
        ks, counts = [], []
        for values in samples:
            n = len(values)
            counts.append(n)
            if self.ratio >= 1:  # label everything: the released code's 1e-4, empty classes included
                ks.append(1e-4)
            elif n < self.min_count:
                ks.append(self.empty_threshold)
            else:
                ks.append(float(np.sort(values)[-int(n * self.ratio) - 1]))
        return np.asarray(ks, dtype=np.float32), counts

    def params(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio, "sample_stride": self.sample_stride, "rule": self.rule,
            "min_count": self.min_count, "empty_threshold": self.empty_threshold,
            "thresholds": None if self.thresholds is None else [float(k) for k in self.thresholds],
            "sample_counts": self.sample_counts,
        }

    def select(self, label: np.ndarray, conf: np.ndarray, probs: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            raise RuntimeError("ClassBalanced: call fit() before selecting")
        k = self.thresholds
        if len(k) != probs.shape[-3]:
            raise ValueError(f"fitted for {len(k)} classes, got probabilities with {probs.shape[-3]}")
        if self.rule == "threshold":
            return np.where(conf >= k[label], label, IGNORE_INDEX).astype(np.uint8)
        shape = [1] * probs.ndim
        shape[-3] = len(k)
        scaled = probs / k.reshape(shape)
        out = scaled.argmax(axis=-3).astype(np.uint8)
        return np.where(scaled.max(axis=-3) < 1.0, IGNORE_INDEX, out).astype(np.uint8)


# ------------------------------------------------------------------------------- ST++ stability
def image_miou(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> float:
    """Per-image mIoU of ``pred`` against ``ref``: nanmean over classes, absent-from-both excluded."""
    valid = (ref != ignore_index) & (pred != ignore_index) & (ref < num_classes) & (pred < num_classes)
    idx = num_classes * ref[valid].astype(np.int64) + pred[valid].astype(np.int64)
    hist = np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)
    inter = np.diag(hist).astype(np.float64)
    union = hist.sum(0) + hist.sum(1) - np.diag(hist)
    present = union > 0
    return float(np.mean(inter[present] / union[present])) if present.any() else math.nan


def stability_scores(
    predictions: Sequence[Sequence[np.ndarray]], num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """ST++ reliability: mean over checkpoints k < K of mIoU(pred_k, pred_K), one score per image.

    ``predictions[k][i]`` is checkpoint k's argmax map of image i; the last checkpoint is the reference.
    An image with nothing to compare (all ignored) scores NaN and sorts last in :func:`split_reliable`.
    """
    if len(predictions) < 2:
        raise ValueError("stability needs predictions of at least two checkpoints")
    n = len(predictions[-1])
    if any(len(p) != n for p in predictions):
        raise ValueError("every checkpoint must predict the same images")
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        ref = np.asarray(predictions[-1][i])
        vals = [image_miou(np.asarray(p[i]), ref, num_classes, ignore_index) for p in predictions[:-1]]
        scores[i] = sum(vals) / len(vals)
    return scores


def split_reliable(stems: Sequence[str], scores: Sequence[float]) -> tuple[list[str], list[str]]:
    """ST++'s split: sort by score descending (stable, NaN last); the first ``n // 2`` are reliable.

    With an odd count the extra image goes to the unreliable half, as in the released code.
    """
    if len(stems) != len(scores):
        raise ValueError(f"{len(stems)} stems but {len(scores)} scores")
    order = sorted(range(len(stems)), key=lambda i: (math.isnan(scores[i]), -scores[i]))
    half = len(stems) // 2
    return [stems[i] for i in order[:half]], [stems[i] for i in order[half:]]
