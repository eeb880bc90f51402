"""Online pseudo labelling with momentum networks (the polyp paper, released code ``online_learning_ssl``).

Stage 1 — teacher: a net trained on labeled images only, with a momentum (EMA) copy; the best raw net
and the best momentum net are each selected on validation.

Stage 2 — student (Algorithm 1), from scratch; every step:

1. the teacher (best momentum teacher, or best raw teacher) labels the unlabeled batch — soft ``softmax``
   probabilities or hard labels — on the view that is not noised: the paper (III-B2) trains the noised student
   "to be consistent with the teacher that is not noised". ``teacher_view=clean`` (default): teacher and
   student share the augmentation's geometry, only the student's copy gets its photometric noise, and the
   teacher labels in eval mode; ``teacher_view=student`` is the released code (the teacher labels the
   student's own noised view, in train mode: ``teacher_mode``);
2. the student minimises ``L(labeled) + 0.3 · Dice(unlabeled, pseudo labels)``, L = ``labeled_loss``;
3. online: teacher := EMA of the student (offline: the teacher never changes), its momentum chosen so that
   the stage-1 teacher keeps ``teacher_retain`` of the weights at the end of the stage, at any budget;
4. momentum student := EMA of the student; the momentum student is the delivered model.

EMA is parameters only; a momentum net's BN statistics come from a no-grad train-mode forward on each
labeled batch (the code's logging forward). The released code updates once per EPOCH; at a few hundred steps
that is a handful of updates and the delivered momentum student stays ~97 % its initialisation, so the default
is once per STEP (the paper, section III-C: "after a certain number of steps") with every momentum capped so
that its horizon is at most ``ema_horizon`` of the stage's updates (``schedules.capped_momentum``);
``ema_every=epoch ema_horizon=null`` is the released schedule.
The paper's Table II variants: ``teacher_update`` (online / offline) × ``pseudo_from`` (momentum / raw)
× ``deliver`` (momentum / raw student).

The released code trains with Adam 1e-4 and no LR schedule. This toolkit uses the run's ``train`` section
(shared by every method of a benchmark); to reproduce the code set ``train.optimizer=adam train.lr=1e-4
train.lr_schedule=constant train.weight_decay=0 train.batch_size=8`` (16 for its teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from semiseg.config import RunConfig
from semiseg.data.transforms import (
    StrongTransform,
    polyp_labeled_transform,
    polyp_paper_geometry,
    polyp_paper_noise,
    polyp_paper_transform,
)
from semiseg.engine.hooks import BNRefresh, EMAHook, Hook, ema
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.errors import ConfigError
from semiseg.losses import LabeledLossName, OverlapLoss, labeled_loss, overlap_loss
from semiseg.methods.online import labeled_stream, teacher_forward, unlabeled_stream, weak_view
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.schedules import retaining_momentum
from semiseg.models.ema import EMA, frozen_copy
from semiseg.options import ALL
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.plan import Pipeline, StageInputs
from semiseg.pipeline.training import new_model


class MomentumPLOptions(MethodOptions):
    teacher_update: Literal["online", "offline"] = Field("online", description=(
        "online: the teacher follows the student by EMA (the proposed method); offline: a frozen teacher"))
    pseudo_from: Literal["momentum", "raw"] = Field("momentum", description=(
        "stage-1 net that becomes the teacher: the best momentum net (proposed) or the best raw net"))
    deliver: Literal["momentum", "raw"] = Field("momentum", description=(
        "student net selected on val and delivered: its momentum copy (code, paper) or the raw student"))
    soft_labels: bool = Field(True, description=(
        "soft teacher probabilities (code default use_soft_label=True) or hard labels (0.5 / argmax)"))
    unsup_weight: float = Field(0.3, ge=0, description="weight of the unlabeled loss (code: beta = 0.3)")
    loss: Literal["dice", "tversky"] = Field(
        "dice", description="code: smp DiceLoss (binary, batch-global); the paper says Tversky")
    labeled_loss: LabeledLossName | Literal["same", "run"] = Field("run", description=(
        "loss of the labeled images in both stages. same: the `loss` option, as the code (Dice) and the paper "
        "(Tversky). run (default): the run's train.loss, cross-entropy unless set, chosen on validation: the "
        "supervised controls of the polyp protocol validate at Dice 0.715 with cross-entropy, 0.704 with "
        "cross-entropy+dice and 0.696 with Dice (mean of split seeds 0-2, benchmarks/results/polyp-notes.md); "
        "the unlabeled term keeps `loss`"))
    teacher_view: Literal["clean", "student"] = Field("clean", description=(
        "what the teacher labels. clean: the paper (III-B2, the student noised, the teacher not): both share the "
        "augmentation's geometry and only the student's copy gets its photometric noise (augment=polyp: RGB "
        "shift, brightness / contrast; augment=run: ST++'s colour jitter, grey, blur). student: the code, the "
        "teacher labels the student's own noised view"))
    teacher_retain: float | None = Field(0.5, gt=0, lt=1, description=(
        "online teacher: the stage-1 teacher's share of its weights at the end of the stage; the EMA momentum "
        "is retain ** (1 / updates), so the teacher moves as far at 300 steps as at 30,000 (the paper updates "
        "it once per epoch; per step at teacher_ema_momentum 0.99 the stage-1 teacher is 37 % of it after 100 "
        "steps and 5 % after 300). null: teacher_ema_momentum as given, capped by ema_horizon (before issue 25)"))
    tversky_alpha: float = Field(0.5, ge=0, description="Tversky FP weight (paper: no value; 0.5 = Dice)")
    tversky_beta: float = Field(0.5, ge=0, description="Tversky FN weight (paper: no value; 0.5 = Dice)")
    loss_reduction: Literal["batch", "image"] = Field("batch", description=(
        "batch: one Dice over the whole batch (code: smp sums over dims (0, 2)); image: per-image Dice mean"))
    teacher_momentum: float = Field(0.95, ge=0, lt=1, description="stage-1 momentum of the teacher's copy")
    student_momentum: float = Field(0.99, ge=0, lt=1, description="momentum of the student's copy (code)")
    teacher_ema_momentum: float = Field(0.99, ge=0, lt=1, description="online teacher EMA from the student")
    ema_every: Literal["epoch", "step"] = Field("step", description=(
        "EMA cadence: every step (paper III-C: 'after a certain number of steps'; budget-proof) or once per "
        "epoch (released code: training_epoch_end; a handful of updates in a short run)"))
    ema_horizon: float | None = Field(0.1, gt=0, le=1, description=(
        "cap of every momentum's horizon 1/(1 - m) as a share of the stage's EMA updates (0.1: m = min(m, "
        "1 - 1/(0.1 U))), so the momentum nets leave their initialisation at any budget; null: the momenta "
        "as given (released code)"))
    momentum_bn: Literal["forward", "ema"] = Field("forward", description=(
        "BN statistics of the momentum nets and the online teacher: a no-grad train-mode forward on each "
        "labeled batch (code: its logging forward) or an EMA of the buffers too"))
    momentum_init: Literal["copy", "independent"] = Field("copy", description=(
        "a momentum net starts as a copy of its net; independent: a second freshly built model, as the code "
        "does (there with ImageNet encoders, so only its decoder differs)"))
    teacher_mode: Literal["train", "eval", "auto"] = Field("auto", description=(
        "mode of the teacher when it labels: train (code: BN batch statistics, dropout active) or eval (not "
        "noised, the paper); auto: eval with teacher_view=clean, train with teacher_view=student"))
    augment: Literal["polyp", "run"] = Field("polyp", description=(
        "polyp: the paper's augmentation (labeled: vflip + rot90; unlabeled: shift-scale-rotate, RGB shift, "
        "brightness/contrast, flips; square data.size only); run: the run's weak augmentation for both"))
    teacher_steps: int | None = Field(None, gt=0, description="steps of stage 1 (default train.steps)")


def _teacher_train_mode(opt: MomentumPLOptions) -> bool:
    return opt.teacher_mode == "train" or (opt.teacher_mode == "auto" and opt.teacher_view == "student")


def _losses(stage: StageInputs) -> tuple[OverlapLoss, Callable[[Tensor, Tensor], Tensor]]:
    """(the unlabeled overlap loss, the labeled loss): chosen by name in :mod:`semiseg.losses`; ``run``: the
    run's ``train.loss``."""
    opt = stage.options
    unlabeled = overlap_loss(opt.loss, alpha=opt.tversky_alpha, beta=opt.tversky_beta,
                             reduction=opt.loss_reduction)
    if opt.labeled_loss == "run":
        return unlabeled, stage.labeled_loss
    return unlabeled, (unlabeled if opt.labeled_loss == "same" else labeled_loss(opt.labeled_loss))


def _momentum_copy(net: nn.Module, fresh: nn.Module | None) -> nn.Module:
    """The frozen momentum twin of ``net``: its copy, or a copy of an independently built ``fresh`` model."""
    return frozen_copy(fresh if fresh is not None else net)


class _MomentumMixin:
    """EMA cadence shared by both stages: the ``emas`` run per step or at each epoch end (EMA hooks); the
    averaged nets' BN statistics come from a train-mode forward on the labeled batch (BN-refresh hooks) or
    from the EMA itself."""

    opt: MomentumPLOptions
    emas: list[EMA]

    def _momentum_hooks(self, bn_nets: list[nn.Module]) -> list[Hook]:
        refresh = [BNRefresh(net) for net in bn_nets] if self.opt.momentum_bn == "forward" else []
        return [*refresh, *(EMAHook(average, every=self.opt.ema_every) for average in self.emas)]

    def _updates(self, steps: int, epoch_steps: int) -> int:
        return steps if self.opt.ema_every == "step" else steps // epoch_steps

    def _ema(self, source: nn.Module, target: nn.Module, momentum: float, steps: int,
             epoch_steps: int) -> EMA:
        """An EMA at the option's cadence, its momentum capped by the stage's number of updates."""
        return ema(source, target, momentum=momentum, updates=self._updates(steps, epoch_steps),
                   horizon=self.opt.ema_horizon, buffers=self.opt.momentum_bn == "ema")


class TeacherTask(_MomentumMixin, TrainingTask):
    """Stage 1: Dice on labeled batches; the momentum copy is validated and selected on its own."""

    def __init__(self, model: nn.Module, labeled: EndlessLoader, stage: StageInputs,
                 fresh: nn.Module | None = None) -> None:
        self.opt = options = stage.options
        steps = stage.steps
        self.nets = {"model": model, "momentum": _momentum_copy(model, fresh)}
        _, self.labeled_loss = _losses(stage)
        self.loaders = {"labeled": labeled}
        self.optimized = [Optimized("model")]
        self.emas = [self._ema(model, self.nets["momentum"], options.teacher_momentum, steps,
                               labeled.batches_per_epoch())]
        self.hooks = self._momentum_hooks([self.nets["momentum"]])

    def extra_eval_nets(self) -> dict[str, nn.Module]:
        return {"momentum": self.nets["momentum"]}

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        batch = batches["labeled"]
        with ctx.autocast():
            loss = self.labeled_loss(self.nets["model"](batch["image"]), batch["mask"])
        ctx.optimize("model", loss)  # then the BN refresh and EMA hooks
        return {"loss": loss.item()}


class StudentTask(_MomentumMixin, TrainingTask):
    """Stage 2 (Algorithm 1): online pseudo labels from the (momentum) teacher for a student from scratch."""

    def __init__(self, student: nn.Module, teacher: nn.Module, labeled: EndlessLoader,
                 unlabeled: EndlessLoader, stage: StageInputs, fresh: nn.Module | None = None) -> None:
        self.opt = options = stage.options
        steps = stage.steps
        self.unlabeled_loss, self.labeled_loss = _losses(stage)
        self.nets = {"student": student, "momentum": _momentum_copy(student, fresh),
                     "teacher": frozen_copy(teacher)}
        # the longer stream defines the epoch (Lightning's max_size_cycle in the code); the other one cycles
        pair = [("unlabeled", unlabeled), ("labeled", labeled)]
        if len(labeled.dataset) > len(unlabeled.dataset):  # type: ignore[arg-type]
            pair.reverse()
        self.loaders = dict(pair)
        self.optimized = [Optimized("student")]
        self.eval_net_name = "momentum" if options.deliver == "momentum" else "student"
        epoch = next(iter(self.loaders.values())).batches_per_epoch()
        self.emas = [self._ema(student, self.nets["momentum"], options.student_momentum, steps, epoch)]
        bn_nets = [self.nets["momentum"]]
        if options.teacher_update == "online":
            online = self._ema(student, self.nets["teacher"], options.teacher_ema_momentum, steps, epoch)
            if options.teacher_retain is not None:
                online.momentum = retaining_momentum(options.teacher_retain, self._updates(steps, epoch))
            self.emas.insert(0, online)
            bn_nets.append(self.nets["teacher"])
        self.hooks = self._momentum_hooks(bn_nets)

    def extra_eval_nets(self) -> dict[str, nn.Module]:
        other = "student" if self.eval_net_name == "momentum" else "momentum"
        extra = {other: self.nets[other]}
        if self.opt.teacher_update == "online":
            extra["teacher"] = self.nets["teacher"]
        return extra

    def pseudo_targets(self, images: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Step 1: ``(hard, soft)`` targets of the teacher on ``images`` (one of them None)."""
        logits = teacher_forward(self.nets["teacher"], images, train_mode=_teacher_train_mode(self.opt))
        prob = logits.softmax(dim=1)
        if not self.opt.soft_labels:
            return prob.argmax(dim=1), None
        return None, (prob[:, 1] if prob.shape[1] == 2 else prob)

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        lab, unl = batches["labeled"], batches["unlabeled"]
        hard, soft = self.pseudo_targets(unl["image"])  # the clean view, or (student view) the only one
        noised = unl["image_strong"] if self.opt.teacher_view == "clean" else unl["image"]
        with ctx.autocast():  # two forwards, as the code's compute_loss(labeled) then compute_loss(unlabeled)
            loss_l = self.labeled_loss(self.nets["student"](lab["image"]), lab["mask"])
            loss_u = self.unlabeled_loss(self.nets["student"](noised), hard, soft)
            loss = loss_l + self.opt.unsup_weight * loss_u
        ctx.optimize("student", loss)  # then the BN refresh and EMA hooks (steps 3 and 4)
        return {"loss": loss.item(), "loss_labeled": loss_l.item(), "loss_unlabeled": loss_u.item()}


def _labeled_transform(run: RunContext, opt: Any) -> Any:
    return weak_view(run) if opt.augment == "run" else polyp_labeled_transform()


def _unlabeled_transforms(run: RunContext, opt: Any) -> tuple[Any, Any]:
    """(unlabeled view, the student's noise on it: None when the teacher labels the student's own view)."""
    if opt.augment == "run":
        return None, StrongTransform(p_cutout=0.0) if opt.teacher_view == "clean" else None
    if opt.teacher_view == "clean":
        return polyp_paper_geometry(), polyp_paper_noise()
    return polyp_paper_transform(), None


TEACHER_OPTIONS = ("loss", "labeled_loss", "tversky_alpha", "tversky_beta", "loss_reduction", "teacher_momentum",
                   "ema_every", "ema_horizon", "momentum_bn", "momentum_init", "augment")


@register
class MomentumPL(Method[MomentumPLOptions]):
    name = "momentum-pl"
    summary = "polyp paper: (momentum) teacher, then a student with online pseudo labels and a momentum copy"
    paper = "Online pseudo labeling for polyp segmentation with momentum networks (online_learning_ssl)"

    @classmethod
    def check_config(cls, config: RunConfig, options: MomentumPLOptions) -> None:
        h, w = config.data.size
        if options.augment == "polyp" and h != w:
            raise ConfigError(f"method.augment=polyp needs a square data.size (RandomRotate90), got {h}x{w}; "
                              "use method.augment=run")

    def plan(self, p: Pipeline) -> None:
        run = self.run
        teacher_seed, seed = run.stage_seed("momentum-pl-teacher"), run.stage_seed("momentum-pl-student")

        def stage1(stage: StageInputs) -> TeacherTask:
            opt = stage.options
            fresh = new_model(run, teacher_seed + 1) if opt.momentum_init == "independent" else None
            labeled = labeled_stream(run, teacher_seed, transform=_labeled_transform(run, opt))
            return TeacherTask(new_model(run), labeled, stage, fresh)

        # stage 1 reads only the options of its loss, its momentum copy and its augmentation: a variant of
        # stage 2 (e.g. an offline teacher) shares it
        teacher = p.train("teacher", stage1, options=TEACHER_OPTIONS,
                          steps=self.options.teacher_steps or run.config.train.steps)

        def stage2(stage: StageInputs) -> StudentTask:
            opt = stage.options
            pseudo = teacher.model(net="momentum" if opt.pseudo_from == "momentum" else None)
            unl_t, noise = _unlabeled_transforms(run, opt)
            fresh = new_model(run, seed + 2) if opt.momentum_init == "independent" else None
            return StudentTask(new_model(run), pseudo,
                               labeled_stream(run, seed, transform=_labeled_transform(run, opt)),
                               unlabeled_stream(run, seed + 1, transform=unl_t, strong=noise or False), stage, fresh)

        p.train("student", stage2, options=ALL, inputs=[teacher])

    def final_net(self) -> str:
        return self.options.deliver
