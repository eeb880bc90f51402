"""Exponential moving average of a model into another: the teacher / momentum-network helper."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from semiseg.models.factory import param_group_of, unwrap

EMAScope = Literal["all", "encoder", "all_but_classifier"]


def _in_scope(name: str, scope: EMAScope) -> bool:
    group = param_group_of(name)
    if scope == "all":
        return True
    if scope == "encoder":
        return group == "encoder"
    return group != "classifier"


def capped_momentum(momentum: float, updates: int, horizon: float | None) -> float:
    """An EMA momentum whose horizon ``1 / (1 − d)`` (the number of updates it effectively averages) is at
    most ``horizon × updates``: ``min(momentum, 1 − 1 / (horizon · updates))``, and 0 (a plain copy) when
    that horizon is shorter than one update. ``horizon`` None: ``momentum`` unchanged (the released codes).

    Why: with ``d = 0.99`` per epoch and 3 epochs, the delivered copy is 0.99³ ≈ 97 % its initialisation;
    with a cap of 10 % of the stage it follows the last tenth of training whatever the budget, and long
    stages (``updates ≥ 1 / (horizon (1 − momentum))``) keep the released momentum exactly.
    """
    if horizon is None:
        return momentum
    limit = horizon * updates
    return 0.0 if limit <= 1 else min(momentum, 1.0 - 1.0 / limit)


def retaining_momentum(retain: float, updates: int) -> float:
    """The EMA momentum ``retain ** (1 / updates)`` under which the target's starting weights still make up
    ``retain`` of it after ``updates`` updates (``d^U = retain``): a share of the start kept at any budget."""
    if not 0 < retain < 1:
        raise ValueError(f"retain must be in (0, 1), got {retain}")
    return retain ** (1.0 / max(1, updates))


class EMA:
    """``target = d * target + (1 - d) * source`` over the parameters in ``scope``.

    ``d = min(1 - 1/(t+1), momentum)`` with warm-up (GTA-Seg / mean teacher), else ``momentum``.
    Buffers (BN running statistics) are copied only when ``buffers=True``: none of the released codes
    averages them, so that is the default. Whether it runs per step or per epoch is the caller's cadence.
    """

    def __init__(self, source: nn.Module, target: nn.Module, *, momentum: float, scope: EMAScope = "all",
                 buffers: bool = False, warmup: bool = False) -> None:
        self.source, self.target = source, target
        self.momentum, self.scope, self.buffers, self.warmup = momentum, scope, buffers, warmup

    def decay(self, t: int) -> float:
        return min(1.0 - 1.0 / (t + 1), self.momentum) if self.warmup else self.momentum

    @torch.no_grad()
    def update(self, t: int = 0) -> float:
        """One EMA update at update count ``t`` (0-based); returns the decay used."""
        d = self.decay(t)
        src = dict(unwrap(self.source).named_parameters())
        for name, tgt in unwrap(self.target).named_parameters():
            if _in_scope(name, self.scope):
                tgt.mul_(d).add_(src[name].detach(), alpha=1.0 - d)
        if self.buffers:
            src_buf = dict(unwrap(self.source).named_buffers())
            for name, tgt in unwrap(self.target).named_buffers():
                if _in_scope(name, self.scope):
                    if tgt.dtype.is_floating_point:
                        tgt.mul_(d).add_(src_buf[name], alpha=1.0 - d)
                    else:
                        tgt.copy_(src_buf[name])
        return d


@contextlib.contextmanager
def net_mode(net: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Put ``net`` in train (``True``) or eval mode for a block and restore its previous mode after."""
    was_training = net.training
    net.train(train)
    try:
        yield net
    finally:
        net.train(was_training)


@torch.no_grad()
def teacher_forward(net: nn.Module, images: Tensor, *, train_mode: bool) -> Tensor:
    """Float logits of ``net`` without gradients. A train-mode forward uses BN batch statistics and
    updates the net's running statistics (that is how the released codes keep teachers' BN current)."""
    with net_mode(net, train_mode):
        return net(images).float()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients off: a teacher or momentum network."""
    import copy

    twin = copy.deepcopy(unwrap(model))
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
