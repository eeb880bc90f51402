"""What a method hands the training loop: its networks, what to optimise, its batch streams, one step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from semiseg.engine.hooks import Hook
from semiseg.engine.loader import EndlessLoader


@dataclass
class Optimized:
    """A network the loop optimises. ``schedule`` None means the run's ``train.lr_schedule``."""

    net: str
    lr: float | None = None
    schedule: Literal["poly", "constant"] | None = None
    head_lr_mult: float | None = None


class StepContext:
    """Handed to ``train_step``: the step (0-based) of ``total_steps``; ``optimize(name, loss)`` runs backward +
    clip + step with AMP."""

    def __init__(self, step: int, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                 optimize: Callable[[str, torch.Tensor], None], total_steps: int) -> None:
        self.step, self.device, self.autocast, self.optimize = step, device, autocast, optimize
        self.total_steps = total_steps


class TrainingTask:
    """Base of every trainable stage. Subclasses set ``nets`` and ``loaders`` and write ``train_step``.

    ``nets`` holds every module whose state must survive a restart (students, teachers, EMA copies);
    the loop wraps the optimised ones in DDP under torchrun, so steps call ``self.nets[name](x)``.
    """

    nets: dict[str, nn.Module]
    loaders: dict[str, EndlessLoader]
    optimized: list[Optimized]
    eval_net_name: str = "model"
    hooks: Sequence[Hook] = ()  # behaviours after each step / epoch (EMA teachers, BN refresh, snapshots)

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError

    def eval_net(self) -> nn.Module:
        from semiseg.models.factory import unwrap

        return unwrap(self.nets[self.eval_net_name])

    def extra_eval_nets(self) -> dict[str, nn.Module]:
        """Further nets validated alongside ``eval_net()``, each selected on its own: the loop logs
        ``val_<name>/<metric>`` and keeps ``checkpoints/best-<name>.pt`` (e.g. a raw and a momentum model)."""
        return {}

    def on_epoch_end(self, epoch: int) -> None:
        """Called when the first loader finishes an epoch (per-epoch EMA lives here)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state of the method (counters, generators) saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
