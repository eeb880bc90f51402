"""Segmentation losses of the five methods, written once and checked against hand computations.

Every function takes logits ``B×C×H×W`` (C >= 2, softmax) and an integer target ``B×H×W`` in which
255 marks ignored pixels. Defaults reproduce the released code of each method; where a paper says
something else, the difference is a keyword argument documented on the function:

- ``cross_entropy``: ST/ST++ and the supervised part of every method (``CrossEntropyLoss(ignore_index=255)``);
  with ``normalize_by`` FixMatch / UniMatch's masked unlabeled CE.
- ``dice_loss`` / ``tversky_loss``: the polyp repo's ``smp.losses.DiceLoss(BINARY_MODE, from_logits=True)``
  (batch-global sums, smooth 0, eps 1e-7), with soft targets for soft pseudo labels. The paper says
  Tversky; the code uses Dice; ``tversky_loss(alpha=beta=0.5)`` is the same loss.
- ``dynamic_cross_entropy``: DST-CBC ``DynamicLoss``.
- ``confidence_weighted_cross_entropy``: GTA-Seg ``compute_unsupervised_loss_conf_weight``.
- ``labeled_loss(name)``: the labeled term chosen by name (cross-entropy, Dice or both), for every method
  that offers the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.config import LabeledLossName  # noqa: F401 - the names of LABELED_LOSSES, for method options
from semiseg.data.classes import IGNORE_INDEX
from semiseg.pseudo.policies import ConfidenceWeights, DropLowest

Reduction = Literal["batch", "image"]
Intersection = Literal["product", "min"]


def _check(logits: Tensor, target: Tensor | None) -> None:
    if logits.ndim != 4 or logits.shape[1] < 2:
        raise ValueError(f"logits must be B×C×H×W with C >= 2, got {tuple(logits.shape)}")
    if target is not None and target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")


def _zero(logits: Tensor) -> Tensor:
    """A zero that still carries a graph, so ``backward()`` works when every pixel is ignored."""
    return logits.sum() * 0.0


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, *,
                  normalize_by: Tensor | None = None) -> Tensor:
    """Mean CE over non-ignored pixels; 0 (with grad, never NaN) when every pixel is ignored.

    ``normalize_by`` (bool, shaped like ``target``): divide the sum over non-ignored pixels by its count instead.
    FixMatch / UniMatch (``loss_u.sum() / (ignore_mask != 255).sum()``) count every real pixel of the view,
    confident or not, so a batch with few confident pixels weighs little rather than being averaged up."""
    _check(logits, target)
    target = target.long()
    valid = target != ignore_index
    if normalize_by is not None and normalize_by.shape != target.shape:
        raise ValueError(f"normalize_by {tuple(normalize_by.shape)} must be shaped like target {tuple(target.shape)}")
    n = valid.sum() if normalize_by is None else normalize_by.sum()
    if n == 0:
        return _zero(logits)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return ce.sum() / n


# ----------------------------------------------------------------------------------------- Dice/Tversky
def _prob_and_target(
    logits: Tensor, target: Tensor | None, soft_target: Tensor | None, foreground: int | None,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Probabilities and (soft) one-vs-rest targets ``B×K×N`` for the K channels the loss looks at.

    Ignored pixels are zeroed in both, as smp does, so they add nothing to any sum.
    """
    _check(logits, target)
    b, c = logits.shape[:2]
    prob = logits.float().log_softmax(dim=1).exp()
    channels = [foreground] if (c == 2 and foreground is not None) else list(range(c))
    valid = torch.ones((b, *logits.shape[2:]), dtype=torch.bool, device=logits.device)
    if target is not None:
        valid = target.long() != ignore_index
    if soft_target is not None:
        soft = soft_target.float()
        if soft.ndim == 3:  # foreground probability of a binary task
            if len(channels) != 1:
                raise ValueError("a B×H×W soft_target needs a binary (C = 2) model; pass B×C×H×W instead")
            tgt = soft.unsqueeze(1)
        elif soft.ndim == 4 and soft.shape[1] == c:
            tgt = soft[:, channels]
        else:
            raise ValueError(f"soft_target must be B×H×W or B×C×H×W, got {tuple(soft.shape)}")
        if tgt.shape[2:] != logits.shape[2:] or tgt.shape[0] != b:
            raise ValueError(f"soft_target {tuple(soft.shape)} does not match logits {tuple(logits.shape)}")
    else:
        if target is None:
            raise ValueError("dice/tversky loss needs target or soft_target")
        hard = torch.where(valid, target.long(), torch.zeros_like(target, dtype=torch.long))
        tgt = torch.stack([(hard == k) for k in channels], dim=1).float()
    p = prob[:, channels]
    mask = valid.unsqueeze(1).to(p.dtype)
    return (p * mask).reshape(b, len(channels), -1), (tgt * mask).reshape(b, len(channels), -1)


def _tversky_terms(
    p: Tensor, t: Tensor, dims: tuple[int, ...], intersection: Intersection
) -> tuple[Tensor, Tensor, Tensor]:
    if intersection == "product":  # smp <= 0.3 (the polyp repo's pinned smp): sum(p * t)
        tp = (p * t).sum(dims)
    elif intersection == "min":  # smp >= 0.4: (sum p + sum t - |p - t|_1) / 2 = sum(min(p, t))
        tp = torch.minimum(p, t).sum(dims)
    else:
        raise ValueError(f"intersection must be 'product' or 'min', got {intersection!r}")
    fp = p.sum(dims) - tp
    fn = t.sum(dims) - tp
    return tp, fp, fn


def _reduce_scores(score: Tensor, t: Tensor, dims: tuple[int, ...], skip_empty: bool) -> Tensor:
    loss = 1.0 - score
    if skip_empty:  # smp: a channel (per reduction group) without target mass contributes 0
        loss = loss * (t.sum(dims) > 0).to(loss.dtype)
    return loss.mean()


def dice_loss(
    logits: Tensor,
    target: Tensor | None,
    *,
    soft_target: Tensor | None = None,
    foreground: int | None = 1,
    smooth: float = 0.0,
    eps: float = 1e-7,
    reduction: Reduction = "batch",
    ignore_index: int = IGNORE_INDEX,
    skip_empty: bool = True,
    intersection: Intersection = "product",
) -> Tensor:
    """Soft Dice loss ``1 - (2·TP + smooth) / max(ΣP + ΣT + smooth, eps)`` on softmax probabilities.

    Defaults are smp's ``DiceLoss(BINARY_MODE, from_logits=True)`` as the polyp repo uses it:
    ``reduction="batch"`` sums over the whole batch and all pixels (one Dice per batch, not per image),
    and with ``skip_empty`` a batch without any foreground target gives loss 0 (smp's rule).
    ``reduction="image"`` computes one Dice per image (and class) and averages them, empty ones
    counting 0 when ``skip_empty``.

    For C = 2 only the ``foreground`` channel is used (``sigmoid(z) == softmax([0, z])[1]``, so this is
    the repo's one-channel loss); for C > 2 (or ``foreground=None``) the loss is the mean over classes of
    one-vs-rest Dice, like smp's multiclass mode. ``soft_target`` gives probabilities instead of hard
    labels (B×H×W foreground probabilities for binary, or B×C×H×W); ``target`` may then be ``None`` or a
    mask whose 255 pixels are still ignored. ``intersection="product"`` is ``Σ p·t`` (the smp the polyp
    repo pinned); ``"min"`` is ``Σ min(p, t)`` (smp >= 0.4), the same for hard targets.
    """
    p, t = _prob_and_target(logits, target, soft_target, foreground, ignore_index)
    dims = (0, 2) if reduction == "batch" else (2,)
    if reduction not in ("batch", "image"):
        raise ValueError(f"reduction must be 'batch' or 'image', got {reduction!r}")
    tp, fp, fn = _tversky_terms(p, t, dims, intersection)
    score = (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth).clamp_min(eps)
    return _reduce_scores(score, t, dims, skip_empty)


def tversky_loss(
    logits: Tensor,
    target: Tensor | None,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    soft_target: Tensor | None = None,
    foreground: int | None = 1,
    smooth: float = 0.0,
    eps: float = 1e-7,
    reduction: Reduction = "batch",
    ignore_index: int = IGNORE_INDEX,
    skip_empty: bool = True,
    intersection: Intersection = "product",
) -> Tensor:
    """Tversky loss ``1 - (TP + smooth) / max(TP + alpha·FP + beta·FN + smooth, eps)`` (smp's form).

    The polyp paper names Tversky; its code trains with Dice. ``alpha`` weights false positives and
    ``beta`` false negatives; ``alpha = beta = 0.5`` is exactly :func:`dice_loss` when ``smooth = 0``.
    Every other argument means what it means in :func:`dice_loss`.
    """
    p, t = _prob_and_target(logits, target, soft_target, foreground, ignore_index)
    if reduction not in ("batch", "image"):
        raise ValueError(f"reduction must be 'batch' or 'image', got {reduction!r}")
    dims = (0, 2) if reduction == "batch" else (2,)
    tp, fp, fn = _tversky_terms(p, t, dims, intersection)
    score = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth).clamp_min(eps)
    return _reduce_scores(score, t, dims, skip_empty)


# ------------------------------------------------------------------------------------------ DST-CBC
def dynamic_cross_entropy(
    logits: Tensor, target: Tensor, *, gamma: float, pseudo_count: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """DST-CBC's dynamic loss: CE where pseudo-labelled pixels are weighted by the student's own confidence.

    The batch is ``[pseudo; labeled]``: the first ``pseudo_count`` samples get the per-pixel weight
    ``softmax(logits).detach()[pseudo class] ** gamma`` (low current confidence = likely wrong pseudo
    label); labeled samples get weight 1. As in the released ``DynamicLoss`` the sum is divided by the
    number of non-ignored pixels, not by the sum of weights. ``gamma = 0`` is plain CE (scripts use 9).
    Unlike the released code, an all-ignored batch gives 0 instead of NaN.
    """
    _check(logits, target)
    if not 0 <= pseudo_count <= logits.shape[0]:
        raise ValueError(f"pseudo_count {pseudo_count} outside [0, batch size {logits.shape[0]}]")
    target = target.long()
    valid = target != ignore_index
    n = valid.sum()
    if n == 0:
        return _zero(logits)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if gamma == 0 or pseudo_count == 0:
        return ce.sum() / n
    with torch.no_grad():
        prob = logits.float().softmax(dim=1)
        index = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
        weight = prob.gather(1, index).squeeze(1)
        weight[pseudo_count:] = 1.0
        weight[:pseudo_count] = weight[:pseudo_count] ** gamma
    return (ce * weight).sum() / n


# -------------------------------------------------------------------------------------------- GTA-Seg
def confidence_weighted_cross_entropy(
    logits: Tensor,
    target: Tensor,
    teacher_logits: Tensor,
    *,
    drop_percent: float = 20.0,
    tau: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    ignored_count_as_dropped: bool = False,
) -> Tensor:
    """GTA-Seg's unsupervised loss: drop the least confident pixels, weight the rest by teacher confidence.

    Released code (``tau=None``): ``c`` = max softmax of ``teacher_logits``; ``thresh`` = the
    ``drop_percent`` percentile of ``c`` over the non-ignored pixels of the whole batch (np.percentile,
    linear); pixels with ``c <= thresh`` are dropped (target 255, ``c = 0``), and
    ``L = Σ_p (c_p + 1)·CE_p / Σ_{all B·H·W pixels q} (c_q + 1)``, so dropped pixels add 1 to the
    denominator. Pixels that were already 255 in ``target`` keep their teacher ``c`` in the denominator,
    as the released code does (its targets never contain 255: labels are padded with 0);
    ``ignored_count_as_dropped=True`` makes them add 1 instead.

    Paper (``tau`` a float): Eq. 6-7, where τ is a Laplace-smoothing constant (τ = 1 in the paper), not a
    temperature: weights ``(c + τ)`` over the kept pixels, normalised to mean 1 over them, and the loss is
    their weighted mean ``Σ_kept (c+τ)·CE / Σ_kept (c+τ)``. The teacher is never back-propagated into.
    """
    return pseudo_label_loss(logits, target, teacher_logits, DropLowest(drop_percent),
                             ConfidenceWeights(tau, ignored_count_as_dropped=ignored_count_as_dropped),
                             ignore_index=ignore_index)


def pseudo_label_loss(logits: Tensor, target: Tensor, teacher_logits: Tensor, selection: DropLowest,
                      weighting: ConfidenceWeights, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """CE on pseudo labels ``target`` where the ``selection`` policy keeps them, weighted by the ``weighting``
    policy; both read the confidence (max softmax) of ``teacher_logits``, which is never back-propagated into."""
    _check(logits, target)
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} != logits {tuple(logits.shape)}")
    target = target.long()
    valid = target != ignore_index
    if valid.sum() == 0:
        return _zero(logits)
    with torch.no_grad():
        conf = teacher_logits.detach().float().softmax(dim=1).amax(dim=1)
        dropped = selection.dropped(conf, valid)
        weight = weighting(conf, dropped, valid)
    return weighted_cross_entropy(logits, torch.where(dropped, torch.full_like(target, ignore_index), target),
                                  weight, ignore_index=ignore_index)


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor, *,
                           ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``Σ weight · CE / Σ weight`` over every pixel (ignored ones add their weight to the normaliser only);
    0 with a graph when nothing is left to learn."""
    kept = target != ignore_index
    if kept.sum() == 0:
        return _zero(logits)
    ce = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    return (weight * ce).sum() / weight.sum()


# ------------------------------------------------------------------------------ labeled losses by name
def cross_entropy_plus_dice(logits: Tensor, target: Tensor) -> Tensor:
    """``CE + Dice``, equal weights: the combination segmentation practice (e.g. nnU-Net) trains with."""
    return cross_entropy(logits, target) + dice_loss(logits, target)


LABELED_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross-entropy": cross_entropy, "dice": dice_loss, "cross-entropy+dice": cross_entropy_plus_dice}


def labeled_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss of labeled pixels chosen by name (one place for every method that offers the choice)."""
    try:
        return LABELED_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown labeled loss {name!r}; choose one of {sorted(LABELED_LOSSES)}") from None


OverlapLossName = Literal["dice", "tversky"]
OverlapLoss = Callable[..., Tensor]  # (logits, hard target | None, soft target | None = None) -> loss


def overlap_loss(name: str, *, alpha: float = 0.5, beta: float = 0.5,
                 reduction: Literal["batch", "image"] = "batch") -> OverlapLoss:
    """A region-overlap loss chosen by name, taking hard or soft targets: ``dice`` or ``tversky`` (false
    positives weighted ``alpha``, false negatives ``beta``; 0.5 / 0.5 is Dice). momentum-pl's loss."""
    if name == "dice":
        return lambda logits, target, soft=None: dice_loss(logits, target, soft_target=soft, reduction=reduction)
    if name == "tversky":
        return lambda logits, target, soft=None: tversky_loss(logits, target, soft_target=soft, alpha=alpha,
                                                              beta=beta, reduction=reduction)
    raise ValueError(f"unknown overlap loss {name!r}; choose dice or tversky")
