"""Schedules counted in steps or as a share of a stage, so that a method behaves alike at 300 and 30 000 steps.

The released codes count in epochs of data sets 10-100x larger than a typical labeled set, over 40-240
epochs. Read literally at a few hundred steps, their supervised-only epochs eat a third of the budget and
their per-epoch or 0.999 EMAs deliver a network that is still mostly its initialisation. Every helper here
turns a share of a stage into steps (or caps a momentum by the stage's length); the released epoch values
stay available as explicit options of the methods that use them.
"""

from __future__ import annotations

import math

from semiseg.models.ema import capped_momentum, retaining_momentum  # noqa: F401 - schedules of the EMAs


def share_of(fraction: float, total: int) -> int:
    """``round(fraction * total)`` steps: a warm-up or ramp given as a share of a ``total``-step stage."""
    return int(round(fraction * total))


def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(−5 (1 − x)²)`` with ``x = step / length`` clipped to [0, 1]; 1 when ``length`` is 0.

    The consistency ramp-up of Laine & Aila (2017) and mean teacher (Tarvainen & Valpola 2017), also CCT's."""
    if length <= 0:
        return 1.0
    x = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - x) ** 2)


def unlabeled_weight(step: int, *, warmup_steps: int, rampup_steps: int) -> float:
    """The weight of an unlabeled loss at ``step``: 0 during a supervised-only warm-up of ``warmup_steps``,
    then :func:`sigmoid_rampup` over the next ``rampup_steps``, then 1."""
    if step < warmup_steps:
        return 0.0
    return sigmoid_rampup(step - warmup_steps, rampup_steps)


def batches_per_epoch(n_images: int, global_batch: int) -> int:
    """Steps of one epoch as :class:`~semiseg.engine.loader.EndlessLoader` counts them (drop last, ≥ 1)."""
    return max(1, n_images // global_batch)


def epoch_rule_steps(teacher_steps: int, n_labeled: int, n_set: int, global_batch: int) -> int:
    """Steps of a re-training that runs as many epochs over its ``n_set`` images as the teacher's
    ``teacher_steps`` ran over the ``n_labeled`` labeled images (ST / ST++'s released code: one ``--epochs``
    for every stage): ``round(teacher_steps · epoch(n_set) / epoch(n_labeled))`` in batches per epoch."""
    epochs = teacher_steps / batches_per_epoch(n_labeled, global_batch)
    return max(1, int(round(epochs * batches_per_epoch(n_set, global_batch))))


def offline_student_steps(train_steps: int, global_batch: int, n_labeled: int, n_set: int, *,
                          fixed: int | None = None, scale: float | None = None) -> int:
    """Steps of an offline student (ST / ST++ re-training, an ATSO-family generation) on a set of ``n_set``
    images: ``fixed``, else ``scale`` x ``train_steps``, else :func:`epoch_rule_steps` (as many epochs over its
    set as the supervised teacher ran over the labeled images: a student sized to the pool it learns from)."""
    if fixed is not None:
        return fixed
    if scale is not None:
        return max(1, round(train_steps * scale))
    return epoch_rule_steps(train_steps, n_labeled, n_set, global_batch)
