"""GTA-Seg: teacher, gentle teaching assistant (TA) and student (released code ``Jin-Ying/GTA-Seg``).

The first ``sup_only`` share of the stage (released code: ``sup_only_epoch`` = 1 epoch of 80; option
``sup_only_epochs``): the student learns from labels only. Then the student is copied once into the teacher
and the TA, and every step runs Algorithm 1:

Step 1  the teacher (eval mode) labels the weak unlabeled view (argmax, confidence); with probability
        ``cutmix_p`` the batch is CutMixed (box of area HW/2 pasted from sample (i+1) % B).
Step 2  the TA learns ONLY from those pseudo labels: confidence-weighted CE, the lowest ``drop_percent``
        pixels dropped by the confidence of a TRAIN-mode teacher forward on the mixed input; one TA step
        (constant LR, ``ta_schedule``); then student := EMA of the TA over the encoder, the paper's Eq. 9
        "feature extractor" (``ta_to_student_scope``; the code: everything but the classifier), decay
        min(1 − 1/(t+1), m), parameters only.
Step 3  the student learns only from labels (it forwards [labeled; unlabeled] so its BN sees both, as the
        code does); one student step; teacher := EMA of the student, decay min(1 − 1/(t+1), m).

m is the code's 0.999 capped so that the EMA's horizon is at most ``ema_horizon`` of the semi-supervised steps
(``schedules.capped_momentum``): with 0.999 alone and a few hundred steps the warm-up never ends, and the
delivered teacher is the flat average of the whole short trajectory. ``ema_horizon=null`` is the code.

The teacher is the delivered model (the student is validated during the supervised epochs, as in the code).

``legacy_weight_aliasing`` reproduces the released code's copy: during the first semi-supervised epoch it
re-ties ``teacher.p.data = student.p.data`` and ``ta.p.data = student.p.data`` at EVERY step (shared storage,
so TA steps write into the student), EMAs re-assign ``.data``, and the student's classifier stays tied to
the TA's for the rest of training (the EMA never re-assigns it). Only buffers warmed by train-mode forwards
of teacher and TA in the supervised epochs are their own. Off by default: one deep copy instead.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from semiseg.data.transforms import cutmix_batch
from semiseg.engine.hooks import ema
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.losses import pseudo_label_loss
from semiseg.methods.online import (
    SupervisedWarmup,
    copy_weights,
    hard_pseudo_labels,
    labeled_stream,
    teacher_forward,
    unlabeled_count,
    unlabeled_stream,
    weak_view,
)
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.schedules import share_of
from semiseg.models.ema import EMA, frozen_copy
from semiseg.models.factory import param_group_of, unwrap
from semiseg.options import ALL
from semiseg.pipeline.plan import Pipeline, StageInputs
from semiseg.pipeline.training import new_model
from semiseg.pseudo.policies import ConfidenceWeights, DropLowest


class GTASegOptions(MethodOptions):
    sup_only: float = Field(0.1, ge=0, lt=1, description=(
        "share of the stage trained supervised-only before the copy (budget-proof; the code's one epoch of 80 "
        "is 1.25 %, a third of a 400-step run with 65 labeled images); ignored when sup_only_epochs is set"))
    sup_only_epochs: int | None = Field(None, ge=0, description=(
        "epochs (passes over the labeled stream) of supervised-only training instead of sup_only (released "
        "code and paper: 1)"))
    ema_horizon: float | None = Field(0.1, gt=0, le=1, description=(
        "cap of both EMAs' horizon 1/(1 - m) as a share of the semi-supervised steps (0.1: m = min(m, "
        "1 - 1/(0.1 N))); null: ta_ema_decay / ema_decay as given (code)"))
    drop_percent: float = Field(20.0, ge=0, lt=100, description=(
        "share of least confident pseudo-labelled pixels dropped (code: drop_percent 80 kept -> 20th percentile)"))
    tau: float | None = Field(None, ge=0, description=(
        "null: the code's weights (c+1) normalised over all pixels; a number: the paper's Eq. 6-7 with "
        "Laplace-smoothing constant tau (paper: 1.0), normalised over the kept pixels"))
    unsup_weight: float = Field(1.0, ge=0, description="weight of the TA's loss (code loss_weight, paper mu: 1)")
    cutmix_p: float = Field(0.5, ge=0, le=1, description="probability of CutMix per batch (code: 0.5)")
    ta_to_student_scope: Literal["all_but_classifier", "encoder"] = Field("encoder", description=(
        "parameters the TA -> student EMA touches. encoder (default): the paper's Eq. 9, the feature extractor "
        "only (its Table 5: 72.10 mIoU, against 64.07 when all parameters are averaged). all_but_classifier: "
        "the code, which excludes only 'decoder.classifier'; on an smp Unet the classifier is the 3x3 "
        "segmentation_head alone, so the code's scope is nearly the whole network, the paper's worst row"))
    ta_schedule: Literal["constant", "poly"] = Field("constant", description=(
        "learning-rate schedule of the TA's optimizer: constant (code: lr_scheduler only updates the student's "
        "optimizer) or poly, decaying with the student's, so a TA does not keep pulling the student at the full "
        "rate once the student's own rate has decayed"))
    ta_ema_decay: float = Field(0.999, ge=0, lt=1, description="TA -> student EMA cap (code: hard-coded 0.999)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description=(
        "student -> teacher EMA cap (code config: 0.999; the paper reports alpha = 0.99)"))
    oversample_labeled: bool = Field(True, description=(
        "repeat the labeled list to the unlabeled count (code), so an epoch is one pass over the unlabeled set"))
    pad_label: int = Field(0, ge=0, le=255, description=(
        "mask value of crop padding: 0 = background (code, inherited from U2PL); 255 = ignore"))
    scale_mode: Literal["gta", "uniform"] = Field("gta", description=(
        "random scale law: gta = U(lo, 1) or U(1, hi) with p 1/2 each (code RandResize); uniform = U(lo, hi)"))
    legacy_weight_aliasing: bool = Field(False, description=(
        "reproduce the code's per-step p.data = s.data tying in the first semi-supervised epoch (see the "
        "module docstring); false: one deep copy student -> teacher and TA"))


def _legacy_ema(ema: EMA, t: int) -> None:
    """The code's EMA: ``p.data = d·p + (1 − d)·s`` re-assigns storage (in-place would corrupt tied storage)."""
    d = ema.decay(t)
    src = dict(unwrap(ema.source).named_parameters())
    with torch.no_grad():
        for name, p in unwrap(ema.target).named_parameters():
            group = param_group_of(name)
            if ema.scope == "all" or group == ema.scope or (ema.scope == "all_but_classifier"
                                                             and group != "classifier"):
                p.data = d * p.data + (1 - d) * src[name].data


def _tie(target: nn.Module, source: nn.Module, *, only: str | None = None) -> None:
    """``target.p.data = source.p.data`` (shared storage), for all parameters or one parameter group."""
    for (name, tp), sp in zip(unwrap(target).named_parameters(), unwrap(source).parameters(), strict=True):
        if only is None or param_group_of(name) == only:
            tp.data = sp.data


def sup_only_steps(options: GTASegOptions, steps: int, epoch_steps: int) -> int:
    """Supervised-only steps: ``sup_only_epochs`` epochs of the labeled stream when set (code), else the
    ``sup_only`` share of the stage."""
    if options.sup_only_epochs is not None:
        return options.sup_only_epochs * epoch_steps
    return share_of(options.sup_only, steps)


class GTATask(TrainingTask):
    def __init__(self, student: nn.Module, labeled: EndlessLoader, unlabeled: EndlessLoader,
                 stage: StageInputs, *, seed: int) -> None:
        self.opt = options = stage.options
        steps = stage.steps
        self.nets = {"student": student, "ta": copy.deepcopy(student), "teacher": frozen_copy(student)}
        self.loaders = {"labeled": labeled, "unlabeled": unlabeled}
        self.optimized = [Optimized("student"), Optimized("ta", schedule=options.ta_schedule)]
        self.epoch_steps = labeled.batches_per_epoch()
        self.sup_steps = sup_only_steps(options, steps, self.epoch_steps)
        self.labeled_loss = stage.labeled_loss
        self.warmup = SupervisedWarmup(self.sup_steps, "student", loss=stage.labeled_loss)
        self.generator = torch.Generator().manual_seed(seed)
        # the TA's pseudo labels: the least confident drop_percent dropped, the rest weighted by confidence
        self.selection = DropLowest(options.drop_percent)
        self.weighting = ConfidenceWeights(options.tau)
        self.steps_done = 0
        semi, horizon = steps - self.sup_steps, options.ema_horizon
        # both EMAs are steps of the algorithm, inside the step (not hooks after it)
        self.ta_to_student = ema(self.nets["ta"], student, momentum=options.ta_ema_decay, updates=semi,
                                 horizon=horizon, warmup=True, scope=options.ta_to_student_scope)
        self.student_to_teacher = ema(student, self.nets["teacher"], momentum=options.ema_decay, updates=semi,
                                      horizon=horizon, warmup=True)

    def eval_net(self) -> nn.Module:
        """The student while it alone is trained (supervised epochs), the teacher afterwards (code)."""
        return unwrap(self.nets["student" if self.steps_done <= self.sup_steps else "teacher"])

    def _ema(self, ema: EMA, t: int) -> None:
        if self.opt.legacy_weight_aliasing:
            _legacy_ema(ema, t)
        else:
            ema.update(t)

    def supervised_step(self, lab: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        out = self.warmup.step(self.nets, lab, ctx)
        if self.opt.legacy_weight_aliasing:  # the code warms teacher / TA BN statistics on labeled images
            teacher_forward(self.nets["teacher"], lab["image"], train_mode=True)
            teacher_forward(self.nets["ta"], lab["image"], train_mode=True)
        return out

    def start_semi_supervised(self, step: int) -> None:
        """The copy student -> teacher and TA (once; legacy: tied at every step of the first semi epoch)."""
        student = unwrap(self.nets["student"])
        if not self.opt.legacy_weight_aliasing:
            if step == self.sup_steps:
                copy_weights(student, unwrap(self.nets["teacher"]))
                copy_weights(student, unwrap(self.nets["ta"]))
        elif step < self.sup_steps + self.epoch_steps:
            _tie(self.nets["teacher"], student)
            _tie(self.nets["ta"], student)

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        self.steps_done = ctx.step + 1
        lab, unl = batches["labeled"], batches["unlabeled"]
        if self.warmup.covers(ctx.step):
            return self.supervised_step(lab, ctx)
        self.start_semi_supervised(ctx.step)
        t = ctx.step - self.sup_steps
        teacher, n = self.nets["teacher"], lab["image"].shape[0]
        # Step 1: eval-mode teacher labels the weak view; CutMix image, label and confidence alike
        label, conf = hard_pseudo_labels(teacher_forward(teacher, unl["image"], train_mode=False))
        image_u, label, _ = cutmix_batch(unl["image"], label, conf, p=self.opt.cutmix_p, generator=self.generator)
        both = torch.cat([lab["image"], image_u])
        # Step 2: the TA learns only from pseudo labels, weighted by a train-mode teacher; EMA TA -> student
        with ctx.autocast():
            ta_logits = self.nets["ta"](both)[n:]
        teacher_logits = teacher_forward(teacher, both, train_mode=True)[n:]
        loss_u = self.opt.unsup_weight * pseudo_label_loss(ta_logits, label, teacher_logits, self.selection,
                                                           self.weighting)
        ctx.optimize("ta", loss_u)
        self._ema(self.ta_to_student, t)
        # Step 3: the student learns from labels only; EMA student -> teacher
        with ctx.autocast():
            loss_l = self.labeled_loss(self.nets["student"](both)[:n], lab["mask"])
        ctx.optimize("student", loss_l)
        self._ema(self.student_to_teacher, t)
        return {"loss_labeled": loss_l.item(), "loss_ta": loss_u.item(), "ema_decay": self.ta_to_student.decay(t)}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.steps_done = state["steps_done"]
        if self.opt.legacy_weight_aliasing and self.steps_done > self.sup_steps:
            _tie(self.nets["ta"], self.nets["student"], only="classifier")  # the tie the code never undoes


@register
class GTASeg(Method[GTASegOptions]):
    name = "gta-seg"
    summary = "teacher labels, a gentle teaching assistant learns from pseudo labels, student from labels"
    paper = "Semi-Supervised Semantic Segmentation via Gentle Teaching Assistant (NeurIPS 2022)"

    def plan(self, p: Pipeline) -> None:
        run = self.run
        seed = run.stage_seed("gta-seg")

        def task(stage: StageInputs) -> GTATask:
            opt = stage.options
            weak = weak_view(run, pad_label=opt.pad_label, scale_mode=opt.scale_mode)
            repeat = unlabeled_count(run) if opt.oversample_labeled else None
            labeled = labeled_stream(run, seed, transform=weak, repeat_to=repeat)
            unlabeled = unlabeled_stream(run, seed + 1, transform=weak)
            return GTATask(new_model(run), labeled, unlabeled, stage, seed=seed + 2)

        p.train("gta-seg", task, options=ALL)

    def final_net(self) -> str:
        return "teacher"  # the code delivers the teacher
