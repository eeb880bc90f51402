"""Exponential moving average of a model into another: the teacher / momentum-network helper."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from semiseg.models.factory import param_group_of, unwrap

EMAScope = Literal["all", "encoder", "all_but_classifier"]


def _in_scope(name: str, scope: EMAScope) -> bool:
    group = param_group_of(name)
    if scope == "all":
        return True
    if scope == "encoder":
        return group == "encoder"
    return group != "classifier"


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


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients off: a teacher or momentum network."""
    import copy

    twin = copy.deepcopy(unwrap(model))
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin
