"""Inference protocols: softmax probabilities of a model for one image, at the image's ORIGINAL size.

Protocols (``PROTOCOLS``), chosen per benchmark / method (see the official-code notes):

- ``resize``: resize the image to ``size`` as the decoded cache does (area when shrinking both sides,
  else bilinear; so test inputs look like training inputs), predict, upsample the probabilities
  bilinearly back to ``H0×W0`` (the polyp paper's 352×352 protocol).
- ``whole``: the image at native size, padded at the bottom/right to a multiple of ``size_divisor``
  (32 for smp encoders) and the output cropped back (ST++).
- ``center_crop``: predict only the centre crop of ``size`` (padded when the image is smaller); outside
  the crop there is no prediction, so ``Prediction.valid`` marks the predicted pixels and the
  evaluator scores only those (GTA/DST-CBC VOC validation, except that padding is never scored).
- ``sliding_window``: full-size windows of ``window`` (default ``size``) every ``stride`` (default 2/3
  of the window, UniMatch), the last window flush with the image edge; softmax summed and divided by
  the per-pixel window count. The image is padded when smaller than the window.

Padding (``pad_mode``): ``"reflect"`` (default; falls back to ``"replicate"`` when the padding is as
large as the image) or ``"zero"`` (0 in normalised space, i.e. the model's mean colour, as UniMatch).

The caller puts the model in ``eval()`` mode (a teacher may deliberately run in train mode); these
functions run under ``torch.inference_mode()``, so returned tensors are inference tensors: ``clone()``
them outside inference mode before using them in autograd (e.g. as loss targets).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.data.cache import resize_image as cache_resize_image
from semiseg.data.normalization import pad_with_mean
from semiseg.data.transforms import to_input
from semiseg.errors import ConfigError

PROTOCOLS = ("resize", "whole", "center_crop", "sliding_window")
PAD_MODES = ("reflect", "zero")
SizeArg = int | Sequence[int]


@dataclass
class Prediction:
    """Probabilities ``C×H0×W0`` of one image; ``valid`` (``H0×W0`` bool) marks predicted pixels.

    ``valid`` is None when every pixel is predicted. Outside ``valid`` the probabilities are 0.
    """

    probs: torch.Tensor
    valid: torch.Tensor | None = None

    def labels(self) -> torch.Tensor:
        """Arg-max class per pixel (``H0×W0`` int64)."""
        # max(0).indices == argmax(0), ties included (first index), but PyTorch's CPU argmax over a leading dim
        # is 4-20x slower: 60 ms for one 540x960 two-class map, more than the model's forward pass at 96 px
        return self.probs.max(0).indices


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for ``device`` (float16 on CUDA, bfloat16 elsewhere) or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _pair(value: SizeArg | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if int(h) <= 0 or int(w) <= 0:
        raise ConfigError(f"{what} must be positive, got {value}")
    return int(h), int(w)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, dict):
        out = out["out"] if "out" in out else next(iter(out.values()))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if out.shape[-2:] != x.shape[-2:]:  # models that predict at a lower stride
        out = F.interpolate(out.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


def predict_batch(model: nn.Module, images: torch.Tensor, *, amp: bool = False) -> torch.Tensor:
    """Softmax probabilities ``B×C×H×W`` (float32) of normalised images ``B×3×H×W`` on their device.

    Used on working-size cached arrays during training and by every protocol below. The caller sets
    ``model.eval()``.
    """
    with torch.inference_mode(), autocast(images.device, amp):
        logits = _logits(model, images)
    with torch.inference_mode():
        return logits.float().softmax(1)


def _pad(model: nn.Module, x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    """Pad ``N×3×H×W`` by ``ph`` rows at the bottom and ``pw`` columns at the right."""
    if ph <= 0 and pw <= 0:
        return x
    pad = (0, max(pw, 0), 0, max(ph, 0))
    if mode == "zero":
        return pad_with_mean(model, x, pad)
    fits = ph < x.shape[-2] and pw < x.shape[-1]
    return F.pad(x, pad, mode="reflect" if fits else "replicate")


def _check_channels(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    if probs.shape[1] != num_classes:
        raise ValueError(f"the model returns {probs.shape[1]} channels; the task has {num_classes} classes")
    return probs


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``H×W×3`` to ``size`` by the decoded cache's rule, so a test image matches what training saw."""
    return cache_resize_image(image, *size)


def _predict_resize(model: nn.Module, image: np.ndarray, size: tuple[int, int], device: torch.device,
                    amp: bool) -> torch.Tensor:
    h0, w0 = image.shape[:2]
    x = to_input(resize_image(image, size)).unsqueeze(0).to(device, torch.float32)
    probs = predict_batch(model, x, amp=amp)
    if (h0, w0) == size:
        return probs
    with torch.inference_mode():
        return F.interpolate(probs, size=(h0, w0), mode="bilinear", align_corners=False)


def _predict_whole(model: nn.Module, x: torch.Tensor, divisor: int, pad_mode: str, amp: bool) -> torch.Tensor:
    h0, w0 = x.shape[-2:]
    ph = -h0 % divisor if divisor > 1 else 0
    pw = -w0 % divisor if divisor > 1 else 0
    return predict_batch(model, _pad(model, x, ph, pw, pad_mode), amp=amp)[..., :h0, :w0]


def _predict_center(model: nn.Module, x: torch.Tensor, size: tuple[int, int], pad_mode: str, amp: bool,
                    num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    h0, w0 = x.shape[-2:]
    ch, cw = min(size[0], h0), min(size[1], w0)
    top, left = (h0 - ch) // 2, (w0 - cw) // 2
    crop = _pad(model, x[..., top:top + ch, left:left + cw], size[0] - ch, size[1] - cw, pad_mode)
    probs = _check_channels(predict_batch(model, crop, amp=amp), num_classes)
    with torch.inference_mode():
        out = torch.zeros((1, num_classes, h0, w0), device=x.device)
        out[..., top:top + ch, left:left + cw] = probs[..., :ch, :cw]
        valid = torch.zeros((h0, w0), dtype=torch.bool, device=x.device)
        valid[top:top + ch, left:left + cw] = True
    return out, valid


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``0..length`` with full windows, the last one flush with the end."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(n)})


def _windows(h: int, w: int, window: tuple[int, int], stride: tuple[int, int]) -> Iterator[tuple[int, int]]:
    for top in window_starts(h, window[0], stride[0]):
        for left in window_starts(w, window[1], stride[1]):
            yield top, left


def _predict_sliding(model: nn.Module, x: torch.Tensor, window: tuple[int, int], stride: tuple[int, int],
                     pad_mode: str, amp: bool, num_classes: int, batch_size: int) -> torch.Tensor:
    h0, w0 = x.shape[-2:]
    xp = _pad(model, x, window[0] - h0, window[1] - w0, pad_mode)
    h, w = xp.shape[-2:]
    with torch.inference_mode():
        total = torch.zeros((1, num_classes, h, w), device=x.device)
        count = torch.zeros((1, 1, h, w), device=x.device)
    boxes = list(_windows(h, w, window, stride))
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        batch = torch.cat([xp[..., t:t + window[0], s:s + window[1]] for t, s in chunk])
        probs = _check_channels(predict_batch(model, batch, amp=amp), num_classes)
        with torch.inference_mode():
            for k, (t, s) in enumerate(chunk):
                total[..., t:t + window[0], s:s + window[1]] += probs[k]
                count[..., t:t + window[0], s:s + window[1]] += 1
    with torch.inference_mode():
        return (total / count)[..., :h0, :w0]


def predict_probs(
    model: nn.Module,
    image: np.ndarray,
    *,
    protocol: str = "resize",
    size: SizeArg | None = None,
    window: SizeArg | None = None,
    stride: SizeArg | None = None,
    num_classes: int,
    device: torch.device | str = "cpu",
    size_divisor: int = 32,
    pad_mode: str = "reflect",
    batch_size: int = 4,
    amp: bool = False,
) -> Prediction:
    """Probabilities ``C×H0×W0`` of a ``uint8 H0×W0×3`` image under ``protocol`` (module docstring).

    ``size`` is ``(H, W)`` or one int: the resize target (``resize``), the crop (``center_crop``) and the
    default window (``sliding_window``). ``batch_size`` windows are predicted together. Probabilities
    are returned on ``device``; ``valid`` is set by ``center_crop`` only.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"evaluation protocol {protocol!r} unknown; choose one of {', '.join(PROTOCOLS)}")
    if pad_mode not in PAD_MODES:
        raise ConfigError(f"pad_mode {pad_mode!r} unknown; choose one of {', '.join(PAD_MODES)}")
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected a uint8 H×W×3 image, got {type(image).__name__} {shape}")
    dev = torch.device(device)
    size_hw = _pair(size, "size")
    valid = None
    x = to_input(image).unsqueeze(0).to(dev, torch.float32) if protocol != "resize" else None
    if protocol == "whole":
        probs = _predict_whole(model, x, size_divisor, pad_mode, amp)
    elif size_hw is None and not (protocol == "sliding_window" and window is not None):
        raise ConfigError(f"evaluation protocol {protocol!r} needs size=(H, W)")
    elif protocol == "resize":
        probs = _predict_resize(model, image, size_hw, dev, amp)
    elif protocol == "center_crop":
        probs, valid = _predict_center(model, x, size_hw, pad_mode, amp, num_classes)
    else:
        win = _pair(window, "window") or size_hw
        step = _pair(stride, "stride") or (max(1, win[0] * 2 // 3), max(1, win[1] * 2 // 3))
        if step[0] > win[0] or step[1] > win[1]:
            raise ConfigError(f"sliding-window stride {step} larger than the window {win} leaves gaps")
        probs = _predict_sliding(model, x, win, step, pad_mode, amp, num_classes, max(1, batch_size))
    return Prediction(_check_channels(probs, num_classes)[0], valid)
