"""Supervised baseline (SupOnly): labeled images only. With every training image labeled: the oracle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.losses import cross_entropy
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.plan import Pipeline, StageRef
from semiseg.pipeline.training import labeled_loader, make_dataset, make_loader, new_model


class SupervisedTask(TrainingTask):
    """Cross-entropy on labeled batches; the step every other method's teacher stage reuses."""

    def __init__(self, model: nn.Module, loader: Any) -> None:
        self.nets = {"model": model}
        self.loaders = {"labeled": loader}
        self.optimized = [Optimized("model")]

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        batch = batches["labeled"]
        with ctx.autocast():
            loss = cross_entropy(self.nets["model"](batch["image"]), batch["mask"])
        ctx.optimize("model", loss)
        return {"loss": loss.item()}


def train_supervised(pipeline: Pipeline, name: str = "supervised", *, split: str = "labeled",
                     steps: int | None = None, task: Callable[[nn.Module, Any], TrainingTask] = SupervisedTask,
                     params: dict[str, Any] | None = None) -> StageRef:
    """A supervised training stage on ``split``; every method's teacher, so benchmarks share it across methods
    (its key holds no method option).

    The oracle is "the same pipeline with every image labeled": it shares the supervised stage's seed
    (data order, augmentation) and, like every from-scratch network, the run's initialisation, so the two
    differ only in their labels. (With a seed of its own, one unlucky initialisation kept the polyp oracle
    at the class prior for 400 steps.) ``task`` and ``params``: a variant of the step (ST++'s snapshots).
    """
    run = pipeline.run
    seed = run.stage_seed("supervised")

    def make_task() -> TrainingTask:
        loader = labeled_loader(run, seed) if split == "labeled" else _oracle_loader(run, seed)
        return task(new_model(run), loader)

    return pipeline.train(name, make_task, steps=steps, params={"split": split, **(params or {})})


def _oracle_loader(run: RunContext, seed: int) -> Any:
    arrays = run.oracle_arrays()
    ds = make_dataset(run, arrays.images, arrays.masks, range(len(arrays.stems)), seed=seed)
    return make_loader(run, ds, run.config.train.batch_size, seed)


class SupervisedOptions(MethodOptions):
    pass


@register
class Supervised(Method[SupervisedOptions]):
    name = "supervised"
    summary = "labeled images only (SupOnly baseline)"

    def plan(self, pipeline: Pipeline) -> None:
        train_supervised(pipeline)


@register
class Oracle(Method[MethodOptions]):
    name = "oracle"
    summary = "supervised with every training image labeled (the upper bound; reads the unlabeled masks)"

    def plan(self, pipeline: Pipeline) -> None:
        train_supervised(pipeline, "oracle", split="oracle")
