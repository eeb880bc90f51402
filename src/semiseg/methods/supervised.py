"""Supervised baseline (SupOnly): labeled images only. With every training image labeled: the oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.losses import cross_entropy
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.stages import Stage
from semiseg.pipeline.training import fit, labeled_loader, load_stage_model, new_model


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


def supervised_stage(run: RunContext, name: str = "supervised", *, split: str = "labeled",
                     steps: int | None = None) -> Stage:
    """A supervised training stage on ``split``; its key lets benchmarks share it across methods.

    The oracle is "the same pipeline with every image labeled": it shares the supervised stage's seed
    (data order, augmentation) and, like every from-scratch network, the run's initialisation, so the two
    differ only in their labels. (With a seed of its own, one unlucky initialisation kept the polyp oracle
    at the class prior for 400 steps.)
    """
    config = run.config
    seed = run.stage_seed("supervised")

    def train(stage_dir: Path) -> None:
        loader = labeled_loader(run, seed) if split == "labeled" else _oracle_loader(run, seed)
        fit(run, SupervisedTask(new_model(run), loader), stage_dir, steps=steps)

    stems = run.splits.labeled if split == "labeled" else run.splits.labeled + run.splits.unlabeled
    key = {"kind": "supervised", "split": split, "stems": stems,
           "val": run.splits.val, "data": config.data.model_dump(mode="json", exclude={"benchmark_gt"}),
           "model": config.model.model_dump(mode="json"), "train": config.train.model_dump(mode="json",
           exclude={"progress", "num_workers", "tensorboard", "eval_every", "checkpoint_every"}),
           "eval_every": config.train.eval_every, "val_metric": run.val_metric, "seed": seed,
           "init_seed": run.init_seed, "steps": steps}
    return Stage(name, train, key=key)


def _oracle_loader(run: RunContext, seed: int) -> Any:
    from semiseg.pipeline.training import make_dataset, make_loader

    arrays = run.oracle_arrays()
    ds = make_dataset(run, arrays.images, arrays.masks, range(len(arrays.stems)), seed=seed)
    return make_loader(run, ds, run.config.train.batch_size, seed)


class SupervisedOptions(MethodOptions):
    pass


@register
class Supervised(Method):
    name = "supervised"
    summary = "labeled images only (SupOnly baseline)"
    options_model = SupervisedOptions

    def stages(self) -> list[Stage]:
        return [supervised_stage(self.run)]

    def final_model(self) -> nn.Module:
        return load_stage_model(self.run, self.run.run_dir / "stages" / "0-supervised")


@register
class Oracle(Method):
    name = "oracle"
    summary = "supervised with every training image labeled (the upper bound; reads the unlabeled masks)"
    options_model = MethodOptions

    def stages(self) -> list[Stage]:
        return [supervised_stage(self.run, "oracle", split="oracle")]

    def final_model(self) -> nn.Module:
        return load_stage_model(self.run, self.run.run_dir / "stages" / "0-oracle")
