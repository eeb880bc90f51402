"""Training behaviours the loop runs after a method's step or epoch, each built once.

A task lists its hooks (``TrainingTask.hooks``); the trainer calls ``after_step(step, batches)`` right after
``train_step`` (what it returns is logged with the step's losses) and ``on_epoch_end(epoch)`` after the
task's own. A method changes a behaviour by choosing another hook, or other arguments, never by rewriting it
(the anchors: USB's ``core/hooks/ema.py``, mmengine's ``EMAHook``).

- ``EMAHook``: a teacher or momentum network as the moving average of a source network, per step or per epoch,
  from a start step on, with warm-up decay, a momentum capped to a horizon of the stage, a scope
  (encoder / all but the classifier) and optionally BN statistics;
- ``BNRefresh``: a no-grad train-mode forward of a network on a batch, so that its BN running statistics
  follow its averaged weights (the released codes' way);
- ``Snapshots``: the weights of a network saved after given steps (ST++'s stability snapshots).

An EMA that is part of the algorithm inside a step (GTA-Seg's TA -> student between two optimizer steps)
uses the same construction, :func:`ema`, and calls its ``update`` where the algorithm says.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from torch import nn

from semiseg.engine.checkpoint import save_checkpoint
from semiseg.models.ema import EMA, EMAScope, capped_momentum, teacher_forward
from semiseg.models.factory import unwrap


class Hook:
    """A behaviour around the steps of a training stage. Subclasses override what they need."""

    def after_step(self, step: int, batches: dict[str, Any]) -> dict[str, float]:
        """After the step ``step`` (0-based) on ``batches``; returns values to log with the step's losses."""
        return {}

    def on_epoch_end(self, epoch: int) -> None:
        """After the first loader finished epoch ``epoch``."""


def ema(source: nn.Module, target: nn.Module, *, momentum: float, updates: int, horizon: float | None = None,
        warmup: bool = False, scope: EMAScope = "all", buffers: bool = False) -> EMA:
    """``target`` as the moving average of ``source``, its momentum capped so that it averages at most
    ``horizon`` of the stage's ``updates`` (``capped_momentum``; None: ``momentum`` as given)."""
    return EMA(source, target, momentum=capped_momentum(momentum, updates, horizon), warmup=warmup, scope=scope,
               buffers=buffers)


class EMAHook(Hook):
    """``target := d·target + (1 − d)·source`` after every step (``every="step"``, from step ``start`` on, the
    update count counted from there) or every epoch; ``log`` names the decay in the step's log."""

    def __init__(self, average: EMA, *, every: Literal["step", "epoch"] = "step", start: int = 0,
                 log: str | None = None) -> None:
        self.average, self.every, self.start, self.log = average, every, start, log

    def after_step(self, step: int, batches: dict[str, Any]) -> dict[str, float]:
        if self.every != "step" or step < self.start:
            return {}
        decay = self.average.update(step - self.start)
        return {self.log: decay} if self.log else {}

    def on_epoch_end(self, epoch: int) -> None:
        if self.every == "epoch":
            self.average.update()


class BNRefresh(Hook):
    """A no-grad train-mode forward of ``net`` on the images of batch ``batch`` after every step."""

    def __init__(self, net: nn.Module, batch: str = "labeled") -> None:
        self.net, self.batch = net, batch

    def after_step(self, step: int, batches: dict[str, Any]) -> dict[str, float]:
        teacher_forward(self.net, batches[self.batch]["image"], train_mode=True)
        return {}


class Snapshots(Hook):
    """``net``'s weights saved to ``path(step)`` after steps ``steps`` (1-based counts). Written before the
    loop's resume checkpoint, so a resumed run replays the same steps and rewrites identical snapshots."""

    def __init__(self, net: Callable[[], nn.Module], steps: list[int], path: Callable[[int], Path], *,
                 is_main: bool = True) -> None:
        self.net, self.steps, self.path, self.is_main = net, set(steps), path, is_main

    def after_step(self, step: int, batches: dict[str, Any]) -> dict[str, float]:
        if step + 1 in self.steps and self.is_main:
            save_checkpoint(self.path(step + 1), {"net": unwrap(self.net()).state_dict(), "step": step + 1})
        return {}
