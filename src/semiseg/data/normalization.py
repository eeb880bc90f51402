"""The model's input normalisation: decided once per run, carried by the model itself.

Data code hands the model float images in ``[0, 1]`` (:func:`semiseg.data.transforms.to_input`); the model
subtracts its encoder's pretraining mean and divides by its std in a forward pre-hook that
:func:`attach_input_normalization` installs. Training, pseudo labelling, evaluation, ``predict``, reports and
export therefore all see the same statistics by construction: they all go through
:func:`semiseg.models.factory.build_model`, which reads them from the run's resolved ``model.normalization``.
The same hook optionally converts the input to channels-last memory format (faster convolutions on some
devices, see ``train.channels_last``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class Normalization(BaseModel):
    """Per-channel RGB ``mean`` and ``std`` on the ``[0, 1]`` scale: ``x_model = (x - mean) / std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, float, float] = Field(description="RGB mean on [0, 1]")
    std: tuple[float, float, float] = Field(description="RGB std on [0, 1]")


# torchvision's ImageNet statistics: what smp's ImageNet encoders were trained with
IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# TF EfficientNet-Lite: inputs scaled to [-1, 1] (timm's tf_efficientnet_lite0 pretrained_cfg)
SYMMETRIC = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# Encoder facts that both the config (which refuses ``weights: imagenet`` without offline weights and resolves
# ``normalization: auto``) and the models (which load the weights) need. Plain data, kept here below both so
# that validating a config imports no model code.

# encoders whose ImageNet weights install with semiseg (``semiseg.models.pretrained`` loads them)
OFFLINE_ENCODERS: tuple[str, ...] = ("efficientnet-lite0",)

# encoders pretrained with other statistics than torchvision's ImageNet ones, by our name and by the smp
# encoder that name builds (``semiseg.models.pretrained``); every other encoder: IMAGENET
_PRETRAINED_WITH: dict[str, Normalization] = {
    "efficientnet-lite0": SYMMETRIC,
    "tu-tf_efficientnet_lite0": SYMMETRIC,
}


def default_normalization(encoder: str) -> Normalization:
    """The input statistics the encoder family was pretrained with (used with or without its weights, so a
    from-scratch and a pretrained run of one encoder see the same inputs)."""
    return _PRETRAINED_WITH.get(encoder, IMAGENET)


class InputNormalization:
    """Forward pre-hook: ``(x - mean) / std`` on the model's input, then the chosen memory format.

    A plain object (not buffers) so that EMA updates, ``state_dict`` and ``load_state_dict`` never touch it;
    ``copy.deepcopy`` of the model (teachers, EMA copies) copies it with the hooks."""

    def __init__(self, normalization: Normalization, channels_last: bool = False) -> None:
        self.normalization = normalization
        self.channels_last = channels_last
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._stats:
            mean = torch.tensor(self.normalization.mean, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
            std = torch.tensor(self.normalization.std, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
            self._stats[key] = (mean, std)
        return self._stats[key]

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        mean, std = self.stats(x)
        x = (x - mean) / std
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, *args[1:])

    def __deepcopy__(self, memo: dict) -> InputNormalization:
        return InputNormalization(self.normalization, self.channels_last)  # the device cache is not state


def attach_input_normalization(model: nn.Module, normalization: Normalization) -> nn.Module:
    """Install the input hook on ``model`` (once) and return it."""
    if getattr(model, "input_normalization", None) is not None:
        raise ValueError("the model already normalises its input")
    hook = InputNormalization(normalization)
    model.register_forward_pre_hook(hook)
    model.input_normalization = hook  # type: ignore[assignment]
    return model


def input_hook(model: nn.Module) -> InputNormalization | None:
    """The model's input hook, or None for a plain module (tests' toy networks)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    hook = getattr(inner, "input_normalization", None)
    return hook if isinstance(hook, InputNormalization) else None


def set_channels_last(model: nn.Module, enabled: bool) -> nn.Module:
    """Weights and inputs in channels-last (NHWC) memory format, or back to contiguous (NCHW)."""
    hook = input_hook(model)
    if hook is not None:
        hook.channels_last = enabled
    return model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)


def pad_with_mean(model: nn.Module, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Constant padding of a ``[0, 1]`` input batch with the model's mean colour, i.e. zero once normalised
    (what "zero padding" meant when data code normalised); plain zeros for a model without the hook."""
    hook = input_hook(model)
    if hook is None:
        return F.pad(x, pad, mode="constant", value=0.0)
    mean = hook.stats(x)[0]
    left, right, top, bottom = pad
    out = mean.expand(x.shape[0], 3, x.shape[-2] + top + bottom, x.shape[-1] + left + right).clone()
    out[..., top:top + x.shape[-2], left:left + x.shape[-1]] = x
    return out
