"""ST and ST++ (Yang et al., CVPR 2022; released code ``LiheYoung/ST-PlusPlus``): offline self-training.

``self-training``: supervised teacher -> pseudo-label every unlabeled image (hard argmax, TTA) -> a
student re-initialised and re-trained on ``labeled * ceil(U / L) + pseudo-labeled`` in one shuffled
loader, with strong augmentation on the pseudo-labeled images (``strong_aug``; plain ST without).
``iterations > 1`` re-labels with the newest student and re-trains again (the paper's appendix B).

Re-training length: the released code runs every stage for the same ``--epochs`` (80 on VOC), so a student
makes as many passes over its ``L·ceil(P/L) + P`` images as the teacher made over the L labeled ones: about
``P/L + 2`` times the teacher's steps (``schedules.epoch_rule_steps``, the default). With 5 % labels that is
20-40x; ``retrain_scale`` (x ``train.steps``) or ``retrain_steps`` fix an affordable length instead.

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
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from semiseg.config import RunConfig
from semiseg.engine.checkpoint import atomic_write_text, load_checkpoint
from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.errors import ConfigError
from semiseg.losses import cross_entropy
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.schedules import epoch_rule_steps
from semiseg.methods.st_stability import (
    SnapshotTask,
    all_unlabeled,
    read_split,
    snapshot_models,
    snapshot_steps,
    stability_stage,
)
from semiseg.methods.supervised import supervised_stage
from semiseg.models.factory import unwrap
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.labeling import (
    label_stage,
    oversampled_size,
    pseudo_dataset,
)
from semiseg.pipeline.stages import Stage, stage_dir
from semiseg.pipeline.training import fit, labeled_loader, load_stage_model, make_loader, new_model
from semiseg.pseudo.policies import SelectAll

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
        "scratch: every re-training starts from the run's shared initialisation (released code and paper: a "
        "fresh ImageNet model); teacher: from the weights of the model that produced the pseudo labels"))
    retrain_steps: int | None = Field(None, gt=0, description=(
        "optimizer steps of each re-training; overrides retrain_scale and the epoch rule"))
    retrain_scale: float | None = Field(None, gt=0, description=(
        "re-training steps as a multiple of train.steps. null (default): the released code's epoch rule, as "
        "many epochs over the re-training set (labeled x ceil(P/L) + P pseudo-labeled) as the supervised "
        "stage ran over the labeled set, i.e. about P/L + 2 times its steps (the current released code also "
        "doubles a labeled list under 200 ids in its supervised stage, official-code-notes section 3: its "
        "ratio is about half of this there)"))
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

    def retrain_steps(self, n_pseudo: int) -> int:
        """Steps of a re-training on the labeled images + ``n_pseudo`` pseudo-labeled ones: ``retrain_steps``,
        else ``retrain_scale`` x ``train.steps``, else the released epoch rule."""
        o, cfg = self.options, self.run.config
        if o.retrain_steps is not None:
            return o.retrain_steps
        if o.retrain_scale is not None:
            return max(1, round(cfg.train.steps * o.retrain_scale))
        n_labeled = len(self.run.splits.labeled)
        return epoch_rule_steps(cfg.train.steps, n_labeled, oversampled_size(n_labeled, n_pseudo),
                                cfg.train.batch_size * self.run.dist.world_size)

    def retrain_sizes(self) -> list[int]:
        """Pseudo-labeled images of each re-training, in order (known before anything runs)."""
        raise NotImplementedError

    def trained_steps(self) -> int:
        """The last re-training's steps; with ``student_init=teacher`` the whole chain back to the teacher."""
        steps = [self.retrain_steps(n) for n in self.retrain_sizes()]
        if self.options.student_init == "teacher":
            return self.run.config.train.steps + sum(steps)
        return steps[-1]

    def _retrain(self, plan: Plan, name: str, *, rounds: list[tuple[Path, str | None, Any]],
                 teacher: tuple[Path, str | None], n_pseudo: int) -> tuple[Path, str | None]:
        """A re-training on labeled + ``rounds`` = [(label stage dir, its key hash, stems or a callable)]
        (``n_pseudo`` pseudo-labeled images in all)."""
        o, run = self.options, self.run
        seed = run.stage_seed(name)
        steps = self.retrain_steps(n_pseudo)

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
                                    teacher=teacher, n_pseudo=len(stems))
            previous = [lab[0]]
        return self._finish(plan)

    def retrain_sizes(self) -> list[int]:
        return [len(self.run.splits.unlabeled)] * self.options.iterations


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
        n_reliable, n_all = self.retrain_sizes()[:2]
        re1 = self._retrain(plan, "retrain-reliable", rounds=[(lab1[0], lab1[1], reliable)], teacher=sup,
                            n_pseudo=n_reliable)
        lab2 = self._label(plan, "label-unreliable", teacher=re1, stems=unreliable,
                           stems_key=[stab[1], "unreliable"])
        teacher = self._retrain(plan, "retrain-all", teacher=re1, n_pseudo=n_all,
                                rounds=[(lab1[0], lab1[1], reliable), (lab2[0], lab2[1], unreliable)])
        previous = [lab1[0], lab2[0]]
        stems = all_unlabeled(run)
        for r in range(1, o.extra_rounds + 1):
            lab = self._label(plan, f"label-extra-{r}", teacher=teacher, stems=stems, stems_key=stems,
                              previous=previous)
            teacher = self._retrain(plan, f"retrain-extra-{r}", rounds=[(lab[0], lab[1], stems)],
                                    teacher=teacher, n_pseudo=n_all)
            previous = [lab[0]]
        return self._finish(plan, stability=sdir)

    def retrain_sizes(self) -> list[int]:
        """Reliable half (``len // 2``, as :func:`split_reliable`), then all, then every extra round: all."""
        n = len(self.run.splits.unlabeled)
        return [n // 2, n] + [n] * self.options.extra_rounds
