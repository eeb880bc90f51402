"""Mean teacher with online pseudo labels: the common teacher-student baseline.

Algorithm (stage of N steps; W = ``sup_warmup``·N warm-up steps, R = ``rampup``·N ramp-up steps):

0. steps t < W: the student learns from the labeled batch only (supervised warm-up); at t = W the teacher
   is copied from the student;
1. the EMA teacher labels the WEAK view of the unlabeled batch: argmax of its softmax, 255 where its
   confidence is below ``conf_threshold``, where the weak crop padded the image, and inside the strong
   view's cutout box;
2. the student sees the labeled batch and the STRONG view of the unlabeled batch (one forward, BN sees both)
   and minimises ``CE(labeled) + w(t) · unsup_weight · CE(strong unlabeled, pseudo labels)`` with the
   sigmoid ramp-up ``w(t) = exp(−5 (1 − (t − W) / R)²)`` (1 after W + R);
3. teacher := d·teacher + (1 − d)·student with ``d = min(1 − 1/(t − W + 1), m)`` and ``m`` the momentum
   capped so that the EMA's horizon is at most ``ema_horizon`` of the stage (``schedules.capped_momentum``).

No released code among the project's references implements this baseline; the defaults are what its modern
users run, each option says whose: a supervised warm-up before the teacher is copied (U2PL, GTA-Seg:
``sup_only_epoch``), the sigmoid consistency ramp-up (mean teacher, CCT), a confidence threshold of 0.95
(UniMatch on VOC, FixMatch); the unlabeled weight 0.5 was chosen on validation. Setting ``sup_warmup=0 rampup=0
conf_threshold=0 ema_horizon=null unsup_weight=1`` gives the plain form: full weight on the teacher's labels from
step 0.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from semiseg.data.classes import IGNORE_INDEX
from semiseg.engine.hooks import EMAHook, ema
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.losses import cross_entropy
from semiseg.methods.online import (
    SupervisedWarmup,
    copy_weights,
    hard_pseudo_labels,
    teacher_forward,
    unlabeled_stream,
)
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.schedules import share_of
from semiseg.models.ema import frozen_copy
from semiseg.models.factory import unwrap
from semiseg.options import ALL
from semiseg.pipeline.plan import Pipeline, StageInputs
from semiseg.pipeline.training import labeled_loader, new_model


class MeanTeacherOptions(MethodOptions):
    ema_momentum: float = Field(0.99, ge=0, lt=1, description=(
        "teacher EMA momentum m; the decay at step t is min(1 - 1/(t+1), m) with ema_warmup (U2PL: 0.99)"))
    ema_warmup: bool = Field(True, description="warm-up decay min(1 - 1/(t+1), m) (mean teacher, U2PL)")
    ema_horizon: float | None = Field(0.1, gt=0, le=1, description=(
        "cap of the EMA's horizon 1/(1 - m) as a share of the stage's semi-supervised steps, so that the "
        "teacher follows the student at any budget (0.1: m = min(m, 1 - 1/(0.1 N))); null: m as given"))
    sup_warmup: float = Field(0.1, ge=0, lt=1, description=(
        "share of the stage trained on labeled images only, after which the teacher is copied from the student "
        "(U2PL / GTA-Seg: sup_only_epoch = 1 of 80 epochs; a share so that short runs get a usable teacher; "
        "0: pseudo labels from step 0)"))
    rampup: float = Field(0.2, ge=0, le=1, description=(
        "share of the stage over which the unlabeled weight ramps up after the warm-up, sigmoid "
        "exp(-5 (1 - x)^2) (mean teacher, Laine & Aila; CCT ramps over 10 %); 0: full weight at once "
        "(U2PL, UniMatch)"))
    ema_buffers: bool = Field(True, description=(
        "also average BN running statistics, so the eval-mode teacher's statistics match its weights "
        "(U2PL / GTA-Seg average parameters only and refresh the teacher's BN by a train-mode forward)"))
    conf_threshold: float = Field(0.95, ge=0, le=1, description=(
        "pseudo labels below this teacher confidence become 255 (UniMatch on VOC and FixMatch: 0.95; "
        "0 keeps all, as UniMatch on Cityscapes)"))
    unsup_weight: float = Field(0.5, ge=0, description=(
        "λ of the unlabeled CE (U2PL: 1; 0.5 chosen on validation Dice, polyp split seeds 0-1, against 1 and "
        "sup_warmup 0.3: benchmarks/results/polyp-notes.md)"))
    teacher_mode: Literal["eval", "train"] = Field(
        "eval", description="mode of the teacher when it labels (train: BN batch statistics, dropout on)")
    student_view: Literal["strong", "weak"] = Field(
        "strong", description="view of the unlabeled images the student learns from (weak: no perturbation)")
    eval_net: Literal["teacher", "student"] = Field(
        "teacher", description="net validated for model selection and delivered")


class MeanTeacherTask(TrainingTask):
    def __init__(self, student: nn.Module, labeled: EndlessLoader, unlabeled: EndlessLoader,
                 stage: StageInputs) -> None:
        self.opt = options = stage.options
        steps = stage.steps
        self.nets = {"student": student, "teacher": frozen_copy(student)}
        self.loaders = {"labeled": labeled, "unlabeled": unlabeled}
        self.optimized = [Optimized("student")]
        self.eval_net_name = options.eval_net
        self.labeled_loss = stage.labeled_loss
        self.warmup = SupervisedWarmup(share_of(options.sup_warmup, steps), "student",
                                       rampup_steps=share_of(options.rampup, steps), loss=stage.labeled_loss)
        self.warmup_steps, self.rampup_steps = self.warmup.steps, self.warmup.rampup_steps
        # Step 3: teacher := EMA of the student after every semi-supervised step
        self.ema = ema(student, self.nets["teacher"], momentum=options.ema_momentum,
                       updates=steps - self.warmup_steps, horizon=options.ema_horizon, warmup=options.ema_warmup,
                       buffers=options.ema_buffers)
        self.hooks = [EMAHook(self.ema, start=self.warmup_steps, log="ema_decay")]
        self.steps_done = 0

    def eval_net(self) -> nn.Module:
        """The student during the supervised warm-up (the teacher is not trained yet), else ``eval_net``."""
        warm = self.steps_done <= self.warmup_steps and self.warmup_steps > 0
        return unwrap(self.nets["student" if warm else self.eval_net_name])

    def pseudo_labels(self, unlabeled: dict[str, Any]) -> torch.Tensor:
        """Step 1: the teacher's labels of the weak view, 255 where the student's view has no information."""
        logits = teacher_forward(self.nets["teacher"], unlabeled["image"],
                                 train_mode=self.opt.teacher_mode == "train")
        strong = self.opt.student_view == "strong"
        ignore = (unlabeled["mask_strong"] if strong else unlabeled["mask"]) == IGNORE_INDEX
        label, _ = hard_pseudo_labels(logits, threshold=self.opt.conf_threshold, ignore=ignore)
        return label

    def unlabeled_weight(self, step: int) -> float:
        """λ · w(t): 0 during the warm-up, then the sigmoid ramp-up to ``unsup_weight``."""
        return self.opt.unsup_weight * self.warmup.unlabeled_weight(step)

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        self.steps_done = ctx.step + 1
        lab, unl = batches["labeled"], batches["unlabeled"]
        if self.warmup.covers(ctx.step):  # Step 0: supervised warm-up, no teacher yet
            return self.warmup.step(self.nets, lab, ctx)
        if ctx.step == self.warmup_steps > 0:  # the teacher starts as the warmed-up student (U2PL)
            copy_weights(unwrap(self.nets["student"]), self.nets["teacher"])
        pseudo = self.pseudo_labels(unl)
        view = unl["image_strong"] if self.opt.student_view == "strong" else unl["image"]
        n, weight = lab["image"].shape[0], self.unlabeled_weight(ctx.step)
        with ctx.autocast():
            logits = self.nets["student"](torch.cat([lab["image"], view]))
            loss_l = self.labeled_loss(logits[:n], lab["mask"])
            loss_u = cross_entropy(logits[n:], pseudo)
            loss = loss_l + weight * loss_u
        ctx.optimize("student", loss)  # then the EMA hook (step 3)
        return {"loss": loss.item(), "loss_labeled": loss_l.item(), "loss_unlabeled": loss_u.item(),
                "unlabeled_weight": weight, "pseudo_coverage": (pseudo != IGNORE_INDEX).float().mean().item()}

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = state.get("steps_done", 0)


@register
class MeanTeacher(Method[MeanTeacherOptions]):
    name = "mean-teacher"
    summary = "EMA teacher labels weak views online; the student learns from strong views (common baseline)"
    paper = "Tarvainen & Valpola 2017 (mean teacher), pseudo-label form as in U2PL / UniMatch"

    def plan(self, p: Pipeline) -> None:
        run = self.run
        seed = run.stage_seed("mean-teacher")

        def task(stage: StageInputs) -> MeanTeacherTask:
            unlabeled = unlabeled_stream(run, seed + 1, strong=stage.options.student_view == "strong")
            return MeanTeacherTask(new_model(run), labeled_loader(run, seed), unlabeled, stage)

        p.train("mean-teacher", task, options=ALL)

    def final_net(self) -> str:
        return self.options.eval_net
