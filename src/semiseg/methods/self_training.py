"""ST and ST++ (Yang et al., CVPR 2022; released code ``LiheYoung/ST-PlusPlus``): offline self-training.

``self-training``: supervised teacher -> pseudo-label every unlabeled image (hard argmax, TTA) -> a
student re-initialised and re-trained on ``labeled * ceil(U / L) + pseudo-labeled`` in one shuffled
loader, with strong augmentation on the pseudo-labeled images (``strong_aug``; plain ST without).
``iterations > 1`` re-labels with the newest student and re-trains again (the paper's appendix B).

``st++``: the supervised stage also keeps snapshots at ``k * steps // K`` (K = 3: E/3, 2E/3, E); each
unlabeled image's stability is the mean per-image mIoU of the earlier snapshots' argmax against the final
one (no TTA); the top half is reliable. The best-on-val supervised model labels the reliable half, a
student is trained on labeled + reliable, its best model labels the unreliable half, and a new student is
trained on labeled + all (reliable images keep their first labels).

Every step is a persisted stage with a content key, so a killed run resumes where it stopped and
identical stages are shared between runs under the same ``out_dir``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from torch import nn

from semiseg.config import RunConfig
from semiseg.engine.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.errors import ConfigError
from semiseg.losses import cross_entropy
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.supervised import SupervisedTask, supervised_stage
from semiseg.models.factory import unwrap
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.labeling import (
    ground_truth_fn,
    label_stage,
    make_labeler,
    pseudo_dataset,
    unlabeled_index,
)
from semiseg.pipeline.stages import Stage, stage_dir
from semiseg.pipeline.training import fit, labeled_loader, load_stage_model, make_loader, new_model
from semiseg.pseudo.policies import SelectAll, image_miou, split_reliable, stability_scores

RELEASED_TTA_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)


class SelfTrainingOptions(MethodOptions):
    strong_aug: bool = Field(True, description=(
        "strong augmentation (colour jitter, grayscale, blur, cutout) on the pseudo-labeled images only, "
        "as ST/ST++'s released code; false = plain self-training (weak augmentation only)"))
    tta_scales: list[float] = Field([1.0], description=(
        "test-time scales of the labeller. Released code: [0.5, 0.75, 1.0, 1.5, 2.0] (RELEASED_TTA_SCALES) "
        "at 321-2048 px crops. Default [1.0] (+ flip): on 96 px synthetic data multi-scale views gave no "
        "better labels (foreground Dice 0.251 with [1.0]+flip, 0.239 with [0.75, 1, 1.5]+flip, 0.231 with "
        "the released five) at 3-6x the cost. Any scale works with smp: views are padded to a multiple "
        "of 32"))
    tta_flip: bool = Field(True, description="also each scale's horizontally flipped view (released code)")
    student_init: Literal["scratch", "teacher"] = Field("scratch", description=(
        "scratch: every re-training re-initialises the student (released code and paper); "
        "teacher: start from the weights of the model that produced the pseudo labels"))
    retrain_steps: int | None = Field(None, gt=0, description=(
        "optimizer steps of each re-training (default: retrain_scale x train.steps). The released code "
        "keeps the EPOCH count (80 on VOC) on a set of L*ceil(U/L)+U images, i.e. roughly U/L times the "
        "supervised stage's steps; set this (or retrain_scale) to match it"))
    retrain_scale: float = Field(1.0, gt=0, description=(
        "re-training steps as a multiple of train.steps when retrain_steps is not given"))
    label_batch_size: int | None = Field(None, gt=0, description="images per labelling batch (default "
                                         "train.batch_size; the released code labels one at a time)")

    @field_validator("tta_scales")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(s <= 0 for s in v):
            raise ValueError("tta_scales must be a non-empty list of positive numbers")
        return v


class STOptions(SelfTrainingOptions):
    iterations: int = Field(1, ge=1, description=(
        "label + re-train rounds; 1 = the paper's ST (no iterative re-training); >1 re-labels every "
        "unlabeled image with the newest student and re-trains again (paper appendix B)"))


class STPlusPlusOptions(SelfTrainingOptions):
    checkpoints: int = Field(3, ge=2, description=(
        "K snapshots of the supervised stage at k*steps//K for the stability score (released code: 3, "
        "at epochs E//3, 2E//3, E)"))
    extra_rounds: int = Field(0, ge=0, description=(
        "after re-training #2, re-label every unlabeled image with the newest student and re-train again, "
        "this many times (paper appendix B; not in the released code)"))


# ------------------------------------------------------------------------------------------- tasks
class SnapshotTask(SupervisedTask):
    """The supervised step, plus the model's weights saved after steps ``snapshot_steps``.

    A snapshot is written inside the step, before the loop's ``last.pt``; a resumed run replays the
    same steps and rewrites identical snapshots.
    """

    def __init__(self, model: nn.Module, loader: Any, snapshot_dir: Path, snapshot_steps: list[int],
                 is_main: bool = True) -> None:
        super().__init__(model, loader)
        self.snapshot_dir, self.snapshot_steps, self.is_main = snapshot_dir, set(snapshot_steps), is_main

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        out = super().train_step(batches, ctx)
        if ctx.step + 1 in self.snapshot_steps and self.is_main:
            save_checkpoint(snapshot_path(self.snapshot_dir, ctx.step + 1),
                            {"net": unwrap(self.nets["model"]).state_dict(), "step": ctx.step + 1})
        return out


class RetrainTask(TrainingTask):
    """Cross-entropy (255 ignored) on mixed batches of labeled and pseudo-labeled images."""

    def __init__(self, model: nn.Module, loader: Any) -> None:
        self.nets = {"model": model}
        self.loaders = {"train": loader}
        self.optimized = [Optimized("model")]

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        batch = batches["train"]
        with ctx.autocast():
            loss = cross_entropy(self.nets["model"](batch["image"]), batch["mask"])
        ctx.optimize("model", loss)
        return {"loss": loss.item(), "pseudo_share": float(batch["pseudo"].float().mean())}


def snapshot_path(stage: Path, step: int) -> Path:
    return stage / "checkpoints" / f"snapshot-{step}.pt"


def snapshot_steps(steps: int, k: int) -> list[int]:
    """ST++'s checkpoints in steps: ``j * steps // k`` for j = 1..k (the last one is the final model)."""
    return [j * steps // k for j in range(1, k + 1)]


def best_checkpoint(stage: Path) -> Path:
    best = stage / "checkpoints" / "best.pt"
    return best if best.exists() else stage / "checkpoints" / "last.pt"


# ------------------------------------------------------------------------------------------- plan
class Plan:
    """Stages in order, each with the directory the runner will give it (``stages/<i>-<name>``)."""

    def __init__(self, run: RunContext) -> None:
        self.run, self.stages, self.dirs = run, [], []

    def add(self, stage: Stage) -> tuple[Path, str | None]:
        self.stages.append(stage)
        self.dirs.append(stage_dir(self.run.run_dir, len(self.stages) - 1, stage))
        return self.dirs[-1], stage.key_hash()


def base_key(run: RunContext) -> dict[str, Any]:
    """The parts of the supervised stage's key every training stage depends on (data, model, train)."""
    key = dict(supervised_stage(run).key or {})
    return {k: key[k] for k in ("stems", "val", "data", "model", "train", "eval_every", "init_seed")}


def all_unlabeled(run: RunContext) -> list[str]:
    return list(run.arrays("unlabeled").stems)


class _SelfTrainingBase(Method):
    options: SelfTrainingOptions

    def _label(self, plan: Plan, name: str, *, teacher: tuple[Path, str | None], stems: Any,
               stems_key: Any, previous: list[Path] | None = None) -> tuple[Path, str | None]:
        o, run, tdir = self.options, self.run, teacher[0]
        key = None if teacher[1] is None else {"kind": "label", "teacher": teacher[1], "stems": stems_key,
                                               "batch": o.label_batch_size}
        return plan.add(label_stage(
            run, name, model=lambda: load_stage_model(run, tdir), stems=stems, policy=SelectAll(),
            tta_scales=tuple(o.tta_scales), tta_flip=o.tta_flip, key=key, batch_size=o.label_batch_size,
            previous=(lambda: previous) if previous else None, checkpoint=lambda: best_checkpoint(tdir)))

    def _retrain(self, plan: Plan, name: str, *, rounds: list[tuple[Path, str | None, Any]],
                 teacher: tuple[Path, str | None]) -> tuple[Path, str | None]:
        """A re-training on labeled + ``rounds`` = [(label stage dir, its key hash, stems or a callable)]."""
        o, run = self.options, self.run
        seed = run.stage_seed(name)
        steps = o.retrain_steps or max(1, round(run.config.train.steps * o.retrain_scale))

        def train(stage: Path) -> None:
            parts = [(d, stems() if callable(stems) else stems) for d, _, stems in rounds]
            ds = pseudo_dataset(run, parts, seed=seed, strong=o.strong_aug)
            model = new_model(run)
            if o.student_init == "teacher":
                model.load_state_dict(unwrap(load_stage_model(run, teacher[0])).state_dict())
            loader = make_loader(run, ds, run.config.train.batch_size, seed)
            fit(run, RetrainTask(model, loader), stage, steps=steps)

        hashes = [h for _, h, _ in rounds]
        key = None
        if all(h is not None for h in hashes) and teacher[1] is not None:
            key = {"kind": "retrain", **base_key(run), "rounds": hashes, "strong_aug": o.strong_aug,
                   "student_init": o.student_init,
                   "teacher": teacher[1] if o.student_init == "teacher" else None,
                   "steps": steps, "seed": seed}
        return plan.add(Stage(name, train, key=key))

    def final_model(self) -> nn.Module:
        """The last re-training's best-on-val model."""
        stages = self.stages()
        i = max(j for j, st in enumerate(stages) if st.name.startswith("retrain"))
        return load_stage_model(self.run, stage_dir(self.run.run_dir, i, stages[i]))

    def _finish(self, plan: Plan, stability: Path | None = None) -> list[Stage]:
        """In benchmark mode, a last stage that tabulates every round's quality (``diagnostics.json``)."""
        if self.run.config.data.benchmark_gt:
            plan.add(diagnostics_stage(self.run, list(plan.dirs), stability))
        return plan.stages


@register
class SelfTraining(_SelfTrainingBase):
    name = "self-training"
    summary = "ST: supervised teacher, offline pseudo labels (TTA), student re-trained from scratch"
    paper = ("Yang et al., ST++: Make Self-training Work Better for Semi-supervised Semantic Segmentation, "
             "CVPR 2022")
    options_model = STOptions
    options: STOptions

    def stages(self) -> list[Stage]:
        run, plan = self.run, Plan(self.run)
        sup = supervised_stage(run)
        teacher = plan.add(sup)
        stems = all_unlabeled(run)
        previous: list[Path] | None = None
        for it in range(1, self.options.iterations + 1):
            suffix = "" if self.options.iterations == 1 else f"-{it}"
            lab = self._label(plan, f"label{suffix}", teacher=teacher, stems=stems, stems_key=stems,
                              previous=previous)
            teacher = self._retrain(plan, f"retrain{suffix}", rounds=[(lab[0], lab[1], stems)],
                                    teacher=teacher)
            previous = [lab[0]]
        return self._finish(plan)


def diagnostics_stage(run: RunContext, dirs: list[Path], stability: Path | None) -> Stage:
    """Benchmark mode: one row per label round (quality against ground truth, flip rate) and per training
    (best validation score), plus ST++'s stability check, into ``run_dir/diagnostics.json``."""

    def work(path: Path) -> None:
        if not run.dist.is_main:
            return
        rounds, trainings = [], []
        for d in dirs:
            if (d / "pseudo" / "DONE").exists():
                st = json.loads((d / "pseudo" / "stats.json").read_text())
                q = st.get("quality") or {}
                rounds.append({"round": d.name, "images": st["num_images"], "foreground_dice": q.get(
                    "foreground_dice"), "miou": q.get("miou"), "flip_rate": st.get("flip_rate")})
            elif (d / "checkpoints" / "best.pt").exists():
                best = load_checkpoint(d / "checkpoints" / "best.pt")
                trainings.append({"stage": d.name, f"best_val_{best.get('val_metric', 'metric')}":
                                  best.get("metric"), "best_step": best.get("step")})
        doc: dict[str, Any] = {"note": "pseudo-label quality of each round against the unlabeled ground "
                                       "truth (benchmark mode; never used for training or selection)",
                               "rounds": rounds, "trainings": trainings}
        if stability is not None:
            doc["stability"] = json.loads((stability / "stability.json").read_text())["quality"]
        text = json.dumps(doc, indent=1)
        atomic_write_text(path / "diagnostics.json", text)
        atomic_write_text(run.run_dir / "diagnostics.json", text)

    return Stage("diagnostics", work, key=None)


# ------------------------------------------------------------------------------------------- ST++
def stability_stage(run: RunContext, name: str, *, models: Callable[[], list[nn.Module]],
                    key: dict[str, Any] | None) -> Stage:
    """Scores every unlabeled image by ST++'s stability and writes ``stability.json``.

    ``models()`` are the K snapshots, the reference (final) one last; each predicts every image once,
    argmax, no TTA, streaming in lockstep. The score is the mean per-image mIoU of snapshots 1..K-1
    against snapshot K; the top half (``len // 2``) is reliable. In benchmark mode the file also records
    how the final snapshot's labels score against ground truth in each half, to check that stability
    tracks quality.
    """

    def work(stage: Path) -> None:
        out = stage / "stability.json"
        if out.exists() or not run.dist.is_main:
            return
        stems = all_unlabeled(run)
        index = unlabeled_index(run, stems)
        stem_of = dict(zip(index, stems, strict=True))
        images = run.arrays("unlabeled").images
        c = run.classes.num_classes
        streams = [make_labeler(run, m).iter_predictions(images, index) for m in models()]
        gt = ground_truth_fn(run, stems)
        scores, finals = [], {}
        for preds in zip(*streams, strict=True):
            maps = [p.argmax(0).astype(np.uint8) for _, p in preds]
            scores.append(float(stability_scores([[m] for m in maps], num_classes=c)[0]))
            if gt is not None:
                stem = stem_of[preds[0][0]]
                finals[stem] = image_miou(maps[-1], gt(stem), c)
        reliable, unreliable = split_reliable(stems, scores)
        info: dict[str, Any] = {"stems": stems, "scores": [None if math.isnan(s) else s for s in scores],
                                "reliable": reliable, "unreliable": unreliable, "quality": None}
        if gt is not None:
            info["quality"] = {"final_snapshot_miou_reliable": _nanmean([finals[s] for s in reliable]),
                               "final_snapshot_miou_unreliable": _nanmean([finals[s] for s in unreliable])}
        atomic_write_text(out, json.dumps(info, indent=1))

    return Stage(name, work, key=key)


def snapshot_models(run: RunContext, sup_dir: Path, k: int) -> list[nn.Module]:
    """The supervised stage's snapshots at ``j * steps // k`` (j < k) and its final weights (``last.pt``)."""
    steps = snapshot_steps(run.config.train.steps, k)
    models = [_snapshot_model(run, snapshot_path(sup_dir, s)) for s in steps[:-1]]
    return [*models, load_stage_model(run, sup_dir, which="model")]


def _snapshot_model(run: RunContext, path: Path) -> nn.Module:
    model = new_model(run)
    model.load_state_dict(load_checkpoint(path)["net"])
    return model.to(run.device).eval()


def _nanmean(values: list[float]) -> float | None:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def read_split(stability_dir: Path) -> tuple[list[str], list[str]]:
    """The reliable and unreliable stems a stability stage wrote."""
    info = json.loads((stability_dir / "stability.json").read_text())
    return info["reliable"], info["unreliable"]


@register
class STPlusPlus(_SelfTrainingBase):
    name = "st++"
    summary = "ST++: stability-ranked selective re-training, reliable half first, then all"
    paper = SelfTraining.paper
    options_model = STPlusPlusOptions
    options: STPlusPlusOptions

    @classmethod
    def check_config(cls, config: RunConfig, options: STPlusPlusOptions) -> None:
        if config.train.steps < options.checkpoints:  # a snapshot at step 0 would never be written
            raise ConfigError(f"method.checkpoints={options.checkpoints} needs train.steps >= "
                              f"{options.checkpoints} (ST++ saves a snapshot every train.steps / checkpoints "
                              f"steps), got {config.train.steps}")

    def _supervised(self) -> Stage:
        """The shared supervised stage's training, plus ST++'s snapshots (hence its own key), unless the
        shared stage already keeps them (its key then lists ``"snapshots"``, saved as :func:`snapshot_path`)."""
        run, k = self.run, self.options.checkpoints
        base = supervised_stage(run)
        seed = run.stage_seed(base.name)
        snaps = snapshot_steps(run.config.train.steps, k)[:-1]
        if base.key is not None and base.key.get("snapshots") == snaps:
            return base

        def train(stage: Path) -> None:
            task = SnapshotTask(new_model(run), labeled_loader(run, seed), stage, snaps,
                                is_main=run.dist.is_main)
            fit(run, task, stage)

        return Stage(base.name, train, key={**(base.key or {}), "snapshots": snaps})

    def stages(self) -> list[Stage]:
        run, plan, o = self.run, Plan(self.run), self.options
        sup = plan.add(self._supervised())
        stab_key = None if sup[1] is None else {"kind": "st++-stability", "supervised": sup[1],
                                                "k": o.checkpoints, "stems": all_unlabeled(run)}
        stab = plan.add(stability_stage(run, "stability", key=stab_key,
                                        models=lambda: snapshot_models(run, sup[0], o.checkpoints)))
        sdir = stab[0]

        def reliable() -> list[str]:
            return read_split(sdir)[0]

        def unreliable() -> list[str]:
            return read_split(sdir)[1]

        lab1 = self._label(plan, "label-reliable", teacher=sup, stems=reliable,
                           stems_key=[stab[1], "reliable"])
        re1 = self._retrain(plan, "retrain-reliable", rounds=[(lab1[0], lab1[1], reliable)], teacher=sup)
        lab2 = self._label(plan, "label-unreliable", teacher=re1, stems=unreliable,
                           stems_key=[stab[1], "unreliable"])
        teacher = self._retrain(plan, "retrain-all", teacher=re1, rounds=[(lab1[0], lab1[1], reliable),
                                                                        (lab2[0], lab2[1], unreliable)])
        previous = [lab1[0], lab2[0]]
        stems = all_unlabeled(run)
        for r in range(1, o.extra_rounds + 1):
            lab = self._label(plan, f"label-extra-{r}", teacher=teacher, stems=stems, stems_key=stems,
                              previous=previous)
            teacher = self._retrain(plan, f"retrain-extra-{r}", rounds=[(lab[0], lab[1], stems)],
                                    teacher=teacher)
            previous = [lab[0]]
        return self._finish(plan, stability=sdir)
