"""FixMatch for segmentation: a weak view labels a strongly augmented one (Sohn et al., NeurIPS 2020), in the
form the UniMatch authors reproduced it (released code ``LiheYoung/UniMatch``, ``fixmatch.py``).

Algorithm (one network, no teacher; every step draws a labeled batch x, an unlabeled batch u and a mix batch m):

1. the network, in eval mode and without gradients, labels the WEAK view of m: argmax, kept where the
   threshold policy keeps it (max probability >= ``conf_threshold``, or its class-relative form chosen by
   ``threshold_rule``), 255 where m's weak crop padded;
2. u's STRONG view (colour jitter p 0.8, greyscale p 0.2, Gaussian blur p 0.5; no cutout) gets, with probability
   ``cutmix_p`` per image, one CutMix box (area U(``cutmix_area``)·HW, aspect U(``cutmix_ratio``)) filled with m's
   strong view;
3. one train-mode forward of [x; weak u] gives the labeled CE and u's weak prediction (detached), selected like
   m's in step 1; inside each box the label is m's from step 1 (the prediction of the UNMIXED m image);
4. a train-mode forward of the strong view; ``loss_u`` = CE summed over the selected pixels / every real (not
   padded) pixel of the view, so unconfident pixels count as zero loss, not as absent;
5. one optimizer step on ``loss_scale · (CE(x) + strong_weight · loss_u)``.

Defaults are the released code's (``fixmatch.py``, ``dataset/semi.py``, ``configs/pascal.yaml``). Options for
what differs from the FixMatch paper or from the authors' stated intent: ``loss_scale`` (the code halves
``(loss_x + loss_u_s) / 2``; the FixMatch paper sums, λ_u = 1) and ``mix_partner`` (the code zips the unlabeled
loader with itself, so m holds the same images as u under other random crops and strong views; the authors call
that unintended and report no difference with other images: UniMatch issue #85). The box and dropout draws of
a step are a pure function of (seed, rank, step), so a resumed run replays an unbroken one.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from semiseg.data.classes import IGNORE_INDEX
from semiseg.data.transforms import StrongTransform, cutmix_boxes, paste_boxes
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.losses import cross_entropy
from semiseg.methods.online import (
    SupervisedWarmup,
    hard_pseudo_labels,
    labeled_stream,
    teacher_forward,
    unlabeled_count,
    unlabeled_stream,
)
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.schedules import share_of
from semiseg.models.factory import unwrap
from semiseg.options import ALL, Declared
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.plan import Pipeline, StageInputs, StageRef
from semiseg.pipeline.training import new_model
from semiseg.pseudo.policies import ONLINE_THRESHOLDS


class FixMatchOptions(MethodOptions):
    conf_threshold: float = Field(0.95, ge=0, le=1, description=(
        "weak-view pseudo labels are kept where the max probability is >= this (UniMatch configs/pascal.yaml "
        "conf_thresh: 0.95, FixMatch paper tau = 0.95; the released cityscapes.yaml later set 0)"))
    threshold_rule: Literal["threshold", "class_relative"] = Field("threshold", description=(
        "how conf_threshold selects: threshold = one value for every class (the released code); class_relative "
        "= per class, scaled by the class's mean probability in the batch (FreeMatch's self-adaptive local "
        "threshold, ICLR 2023; ours: on polyp it slows the collapse to confident background, it does not stop it)"))
    strong_weight: float = Field(1.0, ge=0, description=(
        "weight of the strong view's loss (UniMatch fixmatch.py: loss_x + loss_u_s; FixMatch paper lambda_u = 1)"))
    loss_scale: float = Field(0.5, gt=0, description=(
        "factor on the whole loss (code: (loss_x + loss_u_s) / 2.0; the FixMatch paper: 1, no halving)"))
    cutmix_p: float = Field(0.5, ge=0, le=1, description=(
        "probability of a CutMix box, per image and strong view (code: obtain_cutmix_box p=0.5)"))
    cutmix_area: tuple[float, float] = Field((0.02, 0.4), description=(
        "range of a box's area as a share of the crop, drawn once per box (code: size_min 0.02, size_max 0.4)"))
    cutmix_ratio: tuple[float, float] = Field((0.3, 1 / 0.3), description=(
        "range of a box's aspect h/w, redrawn with its place until the box fits (code: ratio_1 0.3, ratio_2 1/0.3)"))
    mix_partner: Literal["same_image", "other_image"] = Field("same_image", description=(
        "what fills the boxes: same_image = another random crop and strong view of the same image (code: "
        "zip(loader_u, loader_u) yields the same order); other_image = an independently ordered stream (what the "
        "authors call more correct, reporting no difference: UniMatch issue #85)"))
    oversample_labeled: bool = Field(True, description=(
        "repeat the labeled list to the unlabeled count (code: SemiDataset nsample=len(unlabeled)), so a labeled "
        "epoch is as long as an unlabeled one"))
    sup_warmup: float = Field(0.0, ge=0, lt=1, description=(
        "share of the stage trained on labeled images only before the unlabeled losses start (code: 0, from a "
        "pretrained DeepLabV3+ over 80 epochs; mean-teacher's 0.1 is the same idea for short runs whose decoder "
        "starts random)"))

    @field_validator("cutmix_area", "cutmix_ratio")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"needs 0 < low <= high, got {value}")
        return value

    @field_validator("cutmix_area")
    @classmethod
    def _area_share(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[1] > 1:
            raise ValueError(f"an area share is at most 1, got {value}")
        return value


def strong_keys(views: int) -> list[str]:
    """Batch keys of the strong views (see :class:`~semiseg.data.datasets.SegmentationDataset`)."""
    return ["image_strong" + ("" if v == 0 else str(v + 1)) for v in range(views)]


def weak_strong_streams(run: RunContext, seed: int, options: FixMatchOptions, views: int) -> dict[str, EndlessLoader]:
    """Labeled images, unlabeled images with ``views`` strong views, and the mix stream that fills the boxes."""
    strong = StrongTransform(p_cutout=0.0)  # the code's strong views: jitter, grey, blur; boxes come from CutMix
    repeat = unlabeled_count(run) if options.oversample_labeled else None
    mix_order = seed + 1 if options.mix_partner == "same_image" else seed + 2
    return {"labeled": labeled_stream(run, seed, repeat_to=repeat),
            "unlabeled": unlabeled_stream(run, seed + 1, strong=strong, strong_views=views),
            "mix": unlabeled_stream(run, seed + 2, strong=strong, strong_views=views, order_seed=mix_order)}


def train_weak_strong(p: Pipeline, name: str, task_class: type[FixMatchTask], views: int,
                      options: Declared) -> StageRef:
    """The one training stage of fixmatch / unimatch (``task_class``), from the shared initialisation; another
    method planning it with the same ``name`` and ``options`` shares it with their runs under one out_dir."""
    run = p.run
    seed = run.stage_seed(name)

    def task(stage: StageInputs) -> FixMatchTask:
        return task_class(new_model(run), weak_strong_streams(run, seed, stage.options, views), stage,
                          seed=seed + 3, rank=run.dist.rank, views=views)

    return p.train(name, task, options=options)


class FixMatchTask(TrainingTask):
    def __init__(self, model: nn.Module, loaders: dict[str, EndlessLoader], stage: StageInputs, *,
                 seed: int, rank: int = 0, views: int = 1) -> None:
        self.opt, self.seed, self.rank, self.views = stage.options, seed, rank, views
        options = stage.options
        self.labeled_loss = stage.labeled_loss
        self.warmup = SupervisedWarmup(share_of(options.sup_warmup, stage.steps), "model", scale=options.loss_scale,
                                       loss=stage.labeled_loss)
        self.warmup_steps = self.warmup.steps
        self.nets = {"model": model}
        self.loaders = loaders
        self.optimized = [Optimized("model")]
        self.eval_net_name = "model"
        self.policy = ONLINE_THRESHOLDS[options.threshold_rule](options.conf_threshold)

    def step_rng(self, step: int) -> np.random.Generator:
        """The step's random draws (boxes, dropout masks): a pure function of (seed, rank, step)."""
        return np.random.default_rng([self.seed, self.rank, step])

    def pseudo(self, logits: Tensor, ignore_map: Tensor) -> tuple[Tensor, Tensor]:
        """Selected hard labels (255: unselected or padding) and the view's real pixels (the loss denominator)."""
        padded = ignore_map == IGNORE_INDEX
        label, _ = hard_pseudo_labels(logits, ignore=padded, policy=self.policy)
        return label, ~padded

    def forward_weak(self, images: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor | None]:
        """Step 3's forward: logits of [labeled; weak] and of a second stream that learns the weak labels
        (FixMatch has none)."""
        return self.nets["model"](images), None

    def unlabeled_loss(self, strong: list[Tensor], logits_fp: Tensor | None, label: Tensor,
                       valid: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Step 5's unlabeled term: ``strong_weight`` × the mean of the strong views' losses."""
        loss_s = torch.stack(strong).mean()
        return self.opt.strong_weight * loss_s, {"loss_strong": loss_s.item()}

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        lab, unl, mix = batches["labeled"], batches["unlabeled"], batches["mix"]
        model, rng, n = self.nets["model"], self.step_rng(ctx.step), lab["image"].shape[0]
        if self.warmup.covers(ctx.step):  # supervised warm-up: labeled images only
            return self.warmup.step(self.nets, lab, ctx)
        # Step 1: the unmixed mix images labelled by the same network in eval mode, without gradients
        mix_label, mix_valid = self.pseudo(teacher_forward(unwrap(model), mix["image"], train_mode=False),
                                           mix["mask"])
        # Step 2: every strong view its own boxes, filled with the mix batch's same view
        b, _, h, w = unl["image"].shape
        boxes = [cutmix_boxes(b, h, w, rng, p=self.opt.cutmix_p, area=self.opt.cutmix_area,
                              ratio=self.opt.cutmix_ratio) for _ in range(self.views)]
        views = [paste_boxes(box, unl[k], mix[k]) for box, k in zip(boxes, strong_keys(self.views), strict=True)]
        with ctx.autocast():
            # Step 3: labeled loss and the weak prediction that labels the strong views
            logits, logits_fp = self.forward_weak(torch.cat([lab["image"], unl["image"]]), rng)
            label, valid = self.pseudo(logits[n:].detach(), unl["mask"])
            loss_x = self.labeled_loss(logits[:n], lab["mask"])
            # Step 4: the strong views learn the weak labels, and the mix images' labels inside their boxes
            preds = model(torch.cat(views)).chunk(self.views)
            strong = [cross_entropy(pred, paste_boxes(box, label, mix_label),
                                    normalize_by=paste_boxes(box, valid, mix_valid))
                      for pred, box in zip(preds, boxes, strict=True)]
            loss_u, logs = self.unlabeled_loss(strong, None if logits_fp is None else logits_fp[n:], label, valid)
            loss = self.opt.loss_scale * (loss_x + loss_u)
        ctx.optimize("model", loss)  # Step 5
        coverage = (label != IGNORE_INDEX).sum() / valid.sum().clamp(min=1)
        return {"loss": loss.item(), "loss_labeled": loss_x.item(), **logs, "pseudo_coverage": coverage.item(),
                "cutmix_share": torch.stack(boxes).float().mean().item()}


@register
class FixMatch(Method[FixMatchOptions]):
    name = "fixmatch"
    summary = "a weak view labels its strongly augmented, CutMixed view above a confidence threshold (one network)"
    paper = "FixMatch (NeurIPS 2020), segmentation form of the UniMatch code (CVPR 2023)"
    task_class: ClassVar[type[FixMatchTask]] = FixMatchTask

    def strong_views(self) -> int:
        return 1

    def plan(self, p: Pipeline) -> None:
        train_weak_strong(p, self.name, self.task_class, self.strong_views(), options=ALL)
