"""Supervised baseline (SupOnly): labeled images only. With every training image labeled: the oracle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.losses import LabeledLossName, cross_entropy, labeled_loss
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.plan import Pipeline, StageInputs, StageRef
from semiseg.pipeline.training import labeled_loader, make_dataset, make_loader, new_model

Loss = Callable[[Tensor, Tensor], Tensor]


class SupervisedTask(TrainingTask):
    """``loss`` (cross-entropy) on labeled batches: every method's teacher, and the offline students, whose
    batches mix labeled and pseudo-labeled images (``pseudo`` flags the latter: logged as ``pseudo_share``)."""

    def __init__(self, model: nn.Module, loader: Any, loss: Loss = cross_entropy) -> None:
        self.nets = {"model": model}
        self.loaders = {"labeled": loader}
        self.optimized = [Optimized("model")]
        self.loss = loss

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        batch = batches["labeled"]
        with ctx.autocast():
            loss = self.loss(self.nets["model"](batch["image"]), batch["mask"])
        ctx.optimize("model", loss)
        if "pseudo" in batch:
            return {"loss": loss.item(), "pseudo_share": float(batch["pseudo"].float().mean())}
        return {"loss": loss.item()}


def train_supervised(pipeline: Pipeline, name: str = "supervised", *, split: str = "labeled",
                     steps: int | None = None, task: Callable[..., TrainingTask] = SupervisedTask,
                     loss: Loss | None = None, options: Sequence[str] = (),
                     variant: dict[str, Any] | None = None) -> StageRef:
    """A supervised training stage on ``split``; every method's teacher, so benchmarks share it across methods
    (its key holds no method option).

    The oracle is "the same pipeline with every image labeled": it shares the supervised stage's seed
    (data order, augmentation) and, like every from-scratch network, the run's initialisation, so the two
    differ only in their labels. (With a seed of its own, one unlucky initialisation kept the polyp oracle
    at the class prior for 400 steps.) ``task(model, loader, loss=...)``, ``options`` and ``variant``: a variant
    of the step and what it reads (ST++'s snapshots). ``loss``: other than the run's ``train.loss``.
    """
    run = pipeline.run
    seed = run.stage_seed("supervised")

    def make_task(stage: StageInputs) -> TrainingTask:
        loader = labeled_loader(run, seed) if split == "labeled" else _oracle_loader(run, seed)
        return task(new_model(run), loader, loss=loss or stage.labeled_loss)

    return pipeline.train(name, make_task, steps=steps, options=options,
                          variant={"split": split, **(variant or {})})


def _oracle_loader(run: RunContext, seed: int) -> Any:
    arrays = run.oracle_arrays()
    ds = make_dataset(run, arrays.images, arrays.masks, range(len(arrays.stems)), seed=seed)
    return make_loader(run, ds, run.config.train.batch_size, seed)


class SupervisedOptions(MethodOptions):
    loss: LabeledLossName | Literal["run"] = Field("run", description=(
        "run: the run's train.loss, as every method's teacher (cross-entropy by default); or this method's own: "
        "cross-entropy, Dice (momentum-pl's loss, the polyp repo's smp DiceLoss: batch-global, mean one-vs-rest "
        "over classes when there are more than two; the control that tells momentum-pl's loss from its pseudo "
        "labels) or their sum"))


@register
class Supervised(Method[SupervisedOptions]):
    name = "supervised"
    summary = "labeled images only (SupOnly baseline)"

    def plan(self, pipeline: Pipeline) -> None:
        loss = self.options.loss
        if loss == "run":  # the stage every method's teacher shares (its loss: train.loss, in its key)
            train_supervised(pipeline)
        else:
            train_supervised(pipeline, loss=labeled_loss(loss), options=("loss",))


@register
class Oracle(Method[MethodOptions]):
    name = "oracle"
    summary = "supervised with every training image labeled (the upper bound; reads the unlabeled masks)"

    def plan(self, pipeline: Pipeline) -> None:
        train_supervised(pipeline, "oracle", split="oracle")
