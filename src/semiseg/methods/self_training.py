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

from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import Field, field_validator
from torch import nn

from semiseg.config import RunConfig
from semiseg.errors import ConfigError
from semiseg.methods.offline import Round, Stems, label_all, student_steps, train_student
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.st_stability import add_stability, snapshot_steps, snapshot_task
from semiseg.methods.supervised import SupervisedTask, train_supervised
from semiseg.pipeline.diagnostics import add_diagnostics, stage_rows
from semiseg.pipeline.plan import Pipeline, StageRef

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




OptionsT = TypeVar("OptionsT", bound=SelfTrainingOptions)


class _SelfTrainingBase(Method[OptionsT]):
    """Label with a teacher, re-train a student on labeled + pseudo-labeled images; the steps both ST and ST++
    are made of."""

    def label(self, p: Pipeline, name: str, *, teacher: StageRef | Sequence[StageRef], stems: Stems,
              inputs: Sequence[StageRef] = (), previous: Sequence[StageRef] = ()) -> StageRef:
        o = self.options
        return label_all(p, name, teacher=teacher, stems=stems, tta_scales=o.tta_scales, tta_flip=o.tta_flip,
                         batch_size=o.label_batch_size, inputs=inputs, previous=previous)

    def retrain(self, p: Pipeline, name: str, *, rounds: list[Round], teacher: StageRef, n_pseudo: int,
                cutmix: float = 0.0, averages: Sequence[float] = ()) -> StageRef:
        """A student on labeled + ``rounds`` = [(label stage, its stems)] (``n_pseudo`` pseudo-labeled images),
        from the shared initialisation or, with ``student_init=teacher``, from ``teacher``'s model; ``cutmix``:
        the box probability of a batch CutMixed within itself (0: none, as ST/ST++); ``averages``: the student
        delivered as the moving average of its weights (:class:`AveragedStudent`; none, as ST/ST++)."""
        init = teacher if self.options.student_init == "teacher" else None
        return train_student(p, name, rounds, steps=self.retrain_steps(n_pseudo), init=init, cutmix=cutmix,
                             averages=averages)

    def retrain_steps(self, n_pseudo: int) -> int:
        """Steps of a re-training on the labeled images + ``n_pseudo`` pseudo-labeled ones: ``retrain_steps``,
        else ``retrain_scale`` x ``train.steps``, else the released epoch rule."""
        return student_steps(self.run, n_pseudo, fixed=self.options.retrain_steps, scale=self.options.retrain_scale)

    def diagnose(self, p: Pipeline, stability: StageRef | None = None) -> None:
        """Benchmark mode: every round's quality and every training's best validation score."""

        def table() -> dict[str, Any]:
            doc: dict[str, Any] = {"note": "pseudo-label quality of each round against the unlabeled ground "
                                           "truth (benchmark mode; never used for training or selection)",
                                   **stage_rows(p)}
            if stability is not None:
                doc["stability"] = stability.read_json("stability.json")["quality"]
            return doc

        add_diagnostics(p, table)


@register
class SelfTraining(_SelfTrainingBase[STOptions]):
    name = "self-training"
    summary = "ST: supervised teacher, offline pseudo labels (TTA), student re-trained from scratch"
    paper = ("Yang et al., ST++: Make Self-training Work Better for Semi-supervised Semantic Segmentation, "
             "CVPR 2022")

    def plan(self, p: Pipeline) -> None:
        teacher = train_supervised(p)
        stems = list(self.run.splits.unlabeled)
        previous: list[StageRef] = []
        for it in range(1, self.options.iterations + 1):
            suffix = "" if self.options.iterations == 1 else f"-{it}"
            labels = self.label(p, f"label{suffix}", teacher=teacher, stems=stems, previous=previous)
            teacher = self.retrain(p, f"retrain{suffix}", rounds=[(labels, stems)], teacher=teacher,
                                   n_pseudo=len(stems))
            previous = [labels]
        self.diagnose(p)


@register
class STPlusPlus(_SelfTrainingBase[STPlusPlusOptions]):
    name = "st++"
    summary = "ST++: stability-ranked selective re-training, reliable half first, then all"
    paper = SelfTraining.paper

    @classmethod
    def check_config(cls, config: RunConfig, options: STPlusPlusOptions) -> None:
        if config.train.steps < options.checkpoints:  # a snapshot at step 0 would never be written
            raise ConfigError(f"method.checkpoints={options.checkpoints} needs train.steps >= "
                              f"{options.checkpoints} (ST++ saves a snapshot every train.steps / checkpoints "
                              f"steps), got {config.train.steps}")

    def plan(self, p: Pipeline) -> None:
        self.diagnose(p, self.staged(p)[2])

    def staged(self, p: Pipeline) -> tuple[StageRef, list[Round], StageRef]:
        """ST++'s stages: the last student, the pseudo-label rounds it learned from, the stability stage."""
        o, run = self.options, self.run
        snaps = snapshot_steps(run.config.train.steps, o.checkpoints)[:-1]

        def with_snapshots(model: nn.Module, loader: Any, **kwargs: Any) -> SupervisedTask:
            return snapshot_task(model, loader, p["supervised"].path, snaps, is_main=run.dist.is_main, **kwargs)

        sup = train_supervised(p, task=with_snapshots, variant={"snapshots": snaps})
        stability = add_stability(p, sup, o.checkpoints)

        def reliable() -> list[str]:
            return stability.read_json("stability.json")["reliable"]

        def unreliable() -> list[str]:
            return stability.read_json("stability.json")["unreliable"]

        n_reliable, n_all = self.retrain_sizes()[:2]
        labels1 = self.label(p, "label-reliable", teacher=sup, stems=reliable, inputs=[stability])
        student1 = self.retrain(p, "retrain-reliable", rounds=[(labels1, reliable)], teacher=sup,
                                n_pseudo=n_reliable)
        labels2 = self.label(p, "label-unreliable", teacher=student1, stems=unreliable, inputs=[stability])
        teacher = self.retrain(p, "retrain-all", rounds=[(labels1, reliable), (labels2, unreliable)],
                               teacher=student1, n_pseudo=n_all)
        rounds: list[Round] = [(labels1, reliable), (labels2, unreliable)]
        previous, stems = [labels1, labels2], list(run.splits.unlabeled)
        for r in range(1, o.extra_rounds + 1):
            labels = self.label(p, f"label-extra-{r}", teacher=teacher, stems=stems, previous=previous)
            rounds = [(labels, stems)]
            teacher = self.retrain(p, f"retrain-extra-{r}", rounds=rounds, teacher=teacher, n_pseudo=n_all)
            previous = [labels]
        return teacher, rounds, stability

    def retrain_sizes(self) -> list[int]:
        """Reliable half (``len // 2``, as :func:`split_reliable`), then all, then every extra round: all."""
        n = len(self.run.splits.unlabeled)
        return [n // 2, n] + [n] * self.options.extra_rounds
