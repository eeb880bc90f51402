"""Mean teacher with online pseudo labels: the common teacher-student baseline.

Algorithm (one step; t = step index):

1. the EMA teacher labels the WEAK view of the unlabeled batch: argmax of its softmax, 255 where its
   confidence is below ``conf_threshold``, where the weak crop padded the image, and inside the strong
   view's cutout box;
2. the student sees the labeled batch and the STRONG view of the unlabeled batch (one forward, BN sees both)
   and minimises ``CE(labeled) + unsup_weight · CE(strong unlabeled, pseudo labels)``;
3. teacher := d·teacher + (1 − d)·student with ``d = min(1 − 1/(t+1), ema_momentum)``.

No released code among the project's references implements this baseline; defaults are the usual
choices (U2PL / UniMatch style) and say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import Field
from torch import nn

from semiseg.engine.loader import EndlessLoader
from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.losses import cross_entropy
from semiseg.methods.online import hard_pseudo_labels, load_selected, teacher_forward, unlabeled_stream
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.models.ema import EMA, frozen_copy
from semiseg.pipeline.stages import Stage
from semiseg.pipeline.training import fit, labeled_loader, new_model


class MeanTeacherOptions(MethodOptions):
    ema_momentum: float = Field(0.99, ge=0, lt=1, description=(
        "teacher EMA momentum m; the decay at step t is min(1 - 1/(t+1), m) with ema_warmup"))
    ema_warmup: bool = Field(True, description="warm-up decay min(1 - 1/(t+1), m) (mean teacher, U2PL)")
    ema_buffers: bool = Field(True, description=(
        "also average BN running statistics, so the eval-mode teacher's statistics match its weights "
        "(U2PL / GTA-Seg average parameters only and refresh the teacher's BN by a train-mode forward)"))
    conf_threshold: float = Field(0.0, ge=0, le=1, description=(
        "pseudo labels below this teacher confidence become 255 (0: keep all; UniMatch VOC uses 0.95)"))
    unsup_weight: float = Field(1.0, ge=0, description="λ of the unlabeled CE")
    teacher_mode: Literal["eval", "train"] = Field(
        "eval", description="mode of the teacher when it labels (train: BN batch statistics, dropout on)")
    student_view: Literal["strong", "weak"] = Field(
        "strong", description="view of the unlabeled images the student learns from (weak: no perturbation)")
    eval_net: Literal["teacher", "student"] = Field(
        "teacher", description="net validated for model selection and delivered")


class MeanTeacherTask(TrainingTask):
    def __init__(self, student: nn.Module, labeled: EndlessLoader, unlabeled: EndlessLoader,
                 options: MeanTeacherOptions) -> None:
        self.opt = options
        self.nets = {"student": student, "teacher": frozen_copy(student)}
        self.loaders = {"labeled": labeled, "unlabeled": unlabeled}
        self.optimized = [Optimized("student")]
        self.eval_net_name = options.eval_net
        self.ema = EMA(student, self.nets["teacher"], momentum=options.ema_momentum,
                       warmup=options.ema_warmup, buffers=options.ema_buffers)

    def pseudo_labels(self, unlabeled: dict[str, Any]) -> torch.Tensor:
        """Step 1: the teacher's labels of the weak view, 255 where the student's view has no information."""
        logits = teacher_forward(self.nets["teacher"], unlabeled["image"],
                                 train_mode=self.opt.teacher_mode == "train")
        strong = self.opt.student_view == "strong"
        ignore = (unlabeled["mask_strong"] if strong else unlabeled["mask"]) == 255
        label, _ = hard_pseudo_labels(logits, threshold=self.opt.conf_threshold, ignore=ignore)
        return label

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        lab, unl = batches["labeled"], batches["unlabeled"]
        pseudo = self.pseudo_labels(unl)
        view = unl["image_strong"] if self.opt.student_view == "strong" else unl["image"]
        n = lab["image"].shape[0]
        with ctx.autocast():
            logits = self.nets["student"](torch.cat([lab["image"], view]))
            loss_l = cross_entropy(logits[:n], lab["mask"])
            loss_u = cross_entropy(logits[n:], pseudo)
            loss = loss_l + self.opt.unsup_weight * loss_u
        ctx.optimize("student", loss)
        decay = self.ema.update(ctx.step)
        return {"loss": loss.item(), "loss_labeled": loss_l.item(), "loss_unlabeled": loss_u.item(),
                "pseudo_coverage": (pseudo != 255).float().mean().item(), "ema_decay": decay}


@register
class MeanTeacher(Method):
    name = "mean-teacher"
    summary = "EMA teacher labels weak views online; the student learns from strong views (common baseline)"
    paper = "Tarvainen & Valpola 2017 (mean teacher), pseudo-label form as in U2PL / UniMatch"
    options_model = MeanTeacherOptions

    def stages(self) -> list[Stage]:
        run, opt = self.run, cast(MeanTeacherOptions, self.options)
        seed = run.stage_seed("mean-teacher")

        def train(stage_dir: Path) -> None:
            unlabeled = unlabeled_stream(run, seed + 1, strong=opt.student_view == "strong")
            task = MeanTeacherTask(new_model(run), labeled_loader(run, seed), unlabeled, opt)
            fit(run, task, stage_dir)

        return [Stage("mean-teacher", train)]

    def final_model(self) -> nn.Module:
        opt = cast(MeanTeacherOptions, self.options)
        stage = self.run.run_dir / "stages" / "0-mean-teacher"
        return load_selected(self.run, stage, net=opt.eval_net).eval()
