"""What the online teacher-student methods share: batch streams, teacher forwards, pseudo labels, keys.

``mean-teacher``, ``momentum-pl``, ``gta-seg``, ``fixmatch`` and ``unimatch`` each read like their paper's
algorithm box; the plumbing they have in common lives here:

- labeled / unlabeled batch streams. An unlabeled batch carries no ground truth: its ``mask`` is an
  *ignore map* (0 = a real pixel of the image, 255 = padding of the weak crop) and, with the strong
  view, ``mask_strong`` adds 255 inside the cutout box. Pseudo labels take their 255 from it.
- a no-grad forward of a teacher in a chosen train / eval mode that restores the mode afterwards
  (the released codes label with train-mode teachers in places: BN batch statistics, dropout on).
- hard pseudo labels: argmax, selected by a shared policy (``pseudo.policies``; default a confidence threshold).
- the feature-perturbation stream (UniMatch): the encoder's features decoded a second time under channel dropout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.data.classes import IGNORE_INDEX
from semiseg.data.datasets import oversampled_indices
from semiseg.data.transforms import PairTransform, weak_transform
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.task import StepContext
from semiseg.errors import ConfigError
from semiseg.losses import cross_entropy
from semiseg.methods.schedules import unlabeled_weight
from semiseg.models.ema import net_mode, teacher_forward  # noqa: F401 - the methods' teacher helpers
from semiseg.models.factory import unwrap
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.training import make_dataset, make_loader
from semiseg.pseudo.policies import FixedThreshold, Policy


# ----------------------------------------------------------------------------------------- streams
def weak_view(run: RunContext, *, pad_label: int | None = None, scale_mode: str = "uniform") -> PairTransform:
    """The run's weak augmentation (``train.augment``), with the mask padding and scale law overridable."""
    aug = run.config.train.augment
    return weak_transform(tuple(run.config.data.size), scale=tuple(aug.scale),
                          pad_label=aug.pad_label if pad_label is None else pad_label, hflip=aug.hflip,
                          vflip=aug.vflip, scale_mode=scale_mode)


def labeled_stream(run: RunContext, seed: int, *, transform: PairTransform | None = None,
                   repeat_to: int | None = None, batch_size: int | None = None) -> EndlessLoader:
    """Labeled images with masks; ``repeat_to`` oversamples the list (GTA-Seg: to the unlabeled count, so an
    epoch of this stream is one pass over the unlabeled set, as the released code's 1:1 loaders)."""
    arrays = run.arrays("labeled")
    indices = list(range(len(arrays.stems)))
    if repeat_to is not None:
        indices = oversampled_indices(indices, repeat_to, np.random.default_rng(seed))
    ds = make_dataset(run, arrays.images, arrays.masks, indices, seed=seed, transform=transform)
    return make_loader(run, ds, batch_size or run.config.train.batch_size, seed)


def ignore_maps(images: np.ndarray) -> np.ndarray:
    """An all-zero N×H×W "mask" that costs no memory: augmented with the image, it marks padding / cutout."""
    return np.broadcast_to(np.zeros((1, 1, 1), dtype=np.uint8), images.shape[:3])


def unlabeled_count(run: RunContext) -> int:
    n = len(run.arrays("unlabeled").stems)
    if n == 0:
        raise ConfigError(f"method.name={run.config.method.name}: the split has no unlabeled images "
                          "(split.labeled leaves none); use method.name=supervised")
    return n


def unlabeled_stream(run: RunContext, seed: int, *, transform: PairTransform | None = None,
                     strong: bool | PairTransform = False, strong_views: int = 1, batch_size: int | None = None,
                     order_seed: int | None = None) -> EndlessLoader:
    """Unlabeled images. ``mask`` / ``mask_strong`` are ignore maps (see the module docstring), never labels.

    The default weak view pads the ignore map with 255 whatever ``train.augment.pad_label`` says, so
    padded pixels are never pseudo-labelled by methods that take their ignore pixels from it. ``seed`` draws
    the augmentations, ``order_seed`` (default ``seed``) the order of the images: two streams with one
    ``order_seed`` and two ``seed`` give the same images, augmented independently.
    """
    arrays = run.arrays("unlabeled")
    unlabeled_count(run)
    ds = make_dataset(run, arrays.images, ignore_maps(arrays.images), range(len(arrays.stems)), seed=seed,
                      strong=strong, strong_views=strong_views,
                      transform=transform or weak_view(run, pad_label=IGNORE_INDEX))
    bs = batch_size or run.config.train.unlabeled_batch_size or run.config.train.batch_size
    return make_loader(run, ds, bs, seed if order_seed is None else order_seed)


# ---------------------------------------------------------------------------------------- teachers
def hard_pseudo_labels(logits: Tensor, *, threshold: float = 0.0, ignore: Tensor | None = None,
                       policy: Policy | None = None) -> tuple[Tensor, Tensor]:
    """``(label, confidence)``: argmax of the softmax, 255 where ``policy`` (an online selection policy;
    default :class:`~semiseg.pseudo.policies.FixedThreshold` at ``threshold``: confidence < ``threshold``)
    drops the pixel or ``ignore`` is set."""
    label, conf = (policy or FixedThreshold(threshold)).on_tensor(logits.float().softmax(dim=1))
    if ignore is not None:
        label = label.masked_fill(ignore, IGNORE_INDEX)
    return label, conf


def _channel_dropout(features: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """``nn.Dropout2d(p)`` in training mode (whole channels of each sample zeroed, the rest scaled by
    1 / (1 − p)), its mask drawn from ``generator`` so that a resumed run draws what an unbroken one drew."""
    keep = torch.rand(features.shape[:2], generator=generator, device=generator.device) >= p
    scale = keep.to(features.device, features.dtype) / (1.0 - p)
    return features * scale[:, :, None, None]


@contextlib.contextmanager
def feature_perturbation(model: nn.Module, p: float, generator: torch.Generator) -> Iterator[None]:
    """Inside the block a forward of ``model`` (smp layout: ``encoder`` -> ``decoder`` -> head) returns 2B
    outputs for B inputs: the batch, then the batch decoded from its encoder features under channel dropout
    (UniMatch's ``need_fp``: ``decoder([cat(f, Dropout2d(0.5)(f)) for f in features])``). Only the encoder's output
    is doubled, by a forward hook, so the model's own forward runs: its input normalisation and DDP included.
    Outside the block the model is untouched (the hook is removed even on errors)."""

    def double(f: Tensor, x: Tensor) -> Tensor:
        # smp hands the (normalised) input itself on as features[0]: it is not a feature, nothing to drop
        return torch.cat([f, f if f is x else _channel_dropout(f, p, generator)])

    def hook(module: nn.Module, args: tuple[Any, ...], features: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(features, Tensor):  # an encoder with one output (not smp's list of stages)
            return double(features, args[0])
        return [double(f, args[0]) for f in features]

    handle = unwrap(model).encoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def copy_weights(source: nn.Module, target: nn.Module, *, buffers: bool = True) -> None:
    """``target`` := ``source`` in place (parameters, and BN statistics with ``buffers``); the parameter
    objects stay, so optimizers built over ``target`` keep working."""
    src = dict(source.named_parameters())
    for name, p in target.named_parameters():
        p.copy_(src[name])
    if buffers:
        src_buf = dict(source.named_buffers())
        for name, b in target.named_buffers():
            b.copy_(src_buf[name])


@dataclass(frozen=True)
class SupervisedWarmup:
    """The first ``steps`` steps of an online method learn from labels only (U2PL / GTA-Seg's
    ``sup_only_epoch``; mean teacher's warm-up), then the unlabeled loss ramps in over ``rampup_steps``
    (sigmoid, :func:`~semiseg.methods.schedules.unlabeled_weight`). Built once, used by every online method."""

    steps: int
    net: str
    rampup_steps: int = 0
    scale: float = 1.0  # the method's factor on its whole loss (FixMatch code: 0.5)
    loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy  # the run's labeled loss (train.loss)

    def covers(self, step: int) -> bool:
        return step < self.steps

    def step(self, nets: dict[str, nn.Module], batch: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        """One optimizer step of ``net`` on the labeled ``batch`` (the labeled loss, 255 ignored)."""
        with ctx.autocast():
            loss_x = self.loss(nets[self.net](batch["image"]), batch["mask"])
            loss = loss_x if self.scale == 1.0 else self.scale * loss_x
        ctx.optimize(self.net, loss)
        return {"loss": loss.item(), "loss_labeled": loss_x.item(), "unlabeled_weight": 0.0}

    def unlabeled_weight(self, step: int) -> float:
        """0 during the warm-up, then the sigmoid ramp-up to 1."""
        return unlabeled_weight(step, warmup_steps=self.steps, rampup_steps=self.rampup_steps)
