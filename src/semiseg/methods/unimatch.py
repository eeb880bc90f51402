"""UniMatch: FixMatch with a feature-perturbation stream and two strong views (Yang et al., CVPR 2023;
released code ``LiheYoung/UniMatch``, ``unimatch.py``).

Algorithm (one network; x labeled, u unlabeled, m the mix batch; steps 1-2 and 5 as in ``fixmatch``):

1. the network, in eval mode and without gradients, labels m's WEAK view (threshold policy, ``conf_threshold``);
2. each of u's ``strong_views`` STRONG views (jitter, grey, blur, drawn independently) gets CutMix boxes of its own
   (p ``cutmix_p`` per image), filled with m's same strong view;
3. one train-mode forward of [x; weak u] whose encoder features are decoded twice: as they are and under channel
   dropout (``fp_dropout``, the code's ``nn.Dropout2d(0.5)`` on every feature the decoder receives). The clean half
   gives CE(x) and u's weak prediction (detached; selected by the threshold policy, 255 on padding), the
   perturbed half of u the feature-perturbation prediction ``p_fp``;
4. one train-mode forward of the strong views together; each view learns the weak labels, inside its boxes
   m's labels from step 1; ``p_fp`` learns the weak labels; every unlabeled CE is summed over the selected
   pixels and divided by the view's real (not padded) pixels;
5. one optimizer step on ``loss_scale · (CE(x) + strong_weight · mean(loss_s1, loss_s2) + fp_weight · loss_fp)``,
   by default ``(loss_x + 0.25 loss_s1 + 0.25 loss_s2 + 0.5 loss_fp) / 2``, the code's line.

The perturbation exists only inside step 3's forward (a hook on the encoder, removed after it): validation,
pseudo labelling of m and the delivered model run the plain network. Defaults are the released code's
(``unimatch.py``, ``dataset/semi.py``, ``model/semseg/deeplabv3plus.py``, ``configs/pascal.yaml``); the paper's
λ = μ = 0.5 agree with them. The code/intent differences of ``fixmatch`` (``mix_partner``) apply here too;
``strong_views=1`` and ``fp_weight=0`` give the paper's ablations (FixMatch + FP, FixMatch + dual views).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from semiseg.losses import cross_entropy
from semiseg.methods.fixmatch import FixMatch, FixMatchOptions, FixMatchTask
from semiseg.methods.online import feature_perturbation
from semiseg.methods.registry import MethodOptions, register


class UniMatchOptions(FixMatchOptions):
    strong_weight: float = Field(0.5, ge=0, description=(
        "weight of the mean of the strong views' losses (code: 0.25 loss_u_s1 + 0.25 loss_u_s2 = 0.5 x their "
        "mean; paper lambda = 0.5)"))
    fp_weight: float = Field(0.5, ge=0, description=(
        "weight of the feature-perturbation stream's loss (code: 0.5 loss_u_w_fp; paper mu = 0.5); 0 skips the "
        "stream (the paper's ablation without FP)"))
    fp_dropout: float = Field(0.5, ge=0, lt=1, description=(
        "channel-dropout rate on every encoder feature the decoder receives (code: nn.Dropout2d(0.5) on the "
        "DeepLabV3+ low- and high-level features; its U-Net (more-scenarios/medical) drops every skip feature)"))
    strong_views: Literal[1, 2] = Field(2, description=(
        "strong views per unlabeled image, each with its own augmentation and CutMix boxes (code: 2; 1 is the "
        "paper's ablation without dual-stream perturbation)"))


class UniMatchTask(FixMatchTask):
    opt: UniMatchOptions

    def forward_weak(self, images: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor | None]:
        """Step 3: the clean and the feature-perturbed decoding of one encoder pass (BN sees both halves)."""
        if self.opt.fp_weight == 0:
            return super().forward_weak(images, rng)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        with feature_perturbation(self.nets["model"], self.opt.fp_dropout, generator):
            clean, perturbed = self.nets["model"](images).chunk(2)
        return clean, perturbed

    def unlabeled_loss(self, strong: list[Tensor], logits_fp: Tensor | None, label: Tensor,
                       valid: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Step 5's unlabeled terms: the strong views' mean and the feature-perturbed prediction of the weak view."""
        loss, logs = super().unlabeled_loss(strong, logits_fp, label, valid)
        if logits_fp is None:
            return loss, logs
        loss_fp = cross_entropy(logits_fp, label, normalize_by=valid)
        return loss + self.opt.fp_weight * loss_fp, {**logs, "loss_fp": loss_fp.item()}


@register
class UniMatch(FixMatch):
    name = "unimatch"
    summary = "FixMatch + feature perturbation (dropout on encoder features) + two strong CutMix views"
    paper = "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic Segmentation (CVPR 2023)"
    options_model: ClassVar[type[MethodOptions]] = UniMatchOptions
    options: UniMatchOptions
    task_class: ClassVar[type[FixMatchTask]] = UniMatchTask

    def strong_views(self) -> int:
        return self.options.strong_views
