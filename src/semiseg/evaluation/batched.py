"""Batched inference for evaluate / predict / report: the protocols of :mod:`semiseg.evaluation.inference`, over
many images at once.

One image at a time leaves most of a CPU's (or GPU's) throughput unused and serialises decoding with compute.
Here the caller decodes on threads (:func:`semiseg.data.prefetch.prefetch`, with :meth:`BatchPredictor.prepare`
run there too) and :meth:`BatchPredictor.run` forwards several images per call:

- ``resize``: every image becomes the working size, so any consecutive images batch together; each image's
  probabilities are upsampled back to its own original size on the way out (one full-size map alive at a time).
- ``whole``: consecutive images of one size batch together (at most ``MAX_WHOLE_PIXELS`` per batch).
- ``center_crop`` / ``sliding_window``: one image per call (sliding windows are already batched).

A batch gives the same probabilities as one image at a time up to float rounding (eval-mode BatchNorm does
not mix images), so the same masks except at exact ties.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.data.prefetch import group_batches
from semiseg.data.transforms import to_input
from semiseg.errors import ConfigError
from semiseg.evaluation.inference import (
    PAD_MODES,
    PROTOCOLS,
    Prediction,
    SizeArg,
    _pair,
    _predict_whole,
    predict_batch,
    predict_probs,
    resize_image,
)

MAX_WHOLE_PIXELS = 8 * 512 * 512  # input pixels per ``whole`` batch: bounds activation memory at native size

# (image uint8 H×W×3, prepare(image) or None, anything the caller wants back)
Item = tuple[np.ndarray, np.ndarray | None, Any]


class BatchPredictor:
    """Probabilities of many images under one protocol, ``batch_size`` images per forward pass."""

    def __init__(self, model: nn.Module, *, protocol: str = "resize", size: SizeArg | None = None,
                 window: SizeArg | None = None, stride: SizeArg | None = None, num_classes: int,
                 device: torch.device | str = "cpu", batch_size: int = 8, size_divisor: int = 32,
                 pad_mode: str = "reflect", amp: bool = False) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"evaluation protocol {protocol!r} unknown; choose one of {', '.join(PROTOCOLS)}")
        if pad_mode not in PAD_MODES:
            raise ConfigError(f"pad_mode {pad_mode!r} unknown; choose one of {', '.join(PAD_MODES)}")
        self.model = model
        self.protocol = protocol
        self.size = _pair(size, "size")
        if protocol == "resize" and self.size is None:
            raise ConfigError("evaluation protocol 'resize' needs size=(H, W)")
        self.window, self.stride = window, stride
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.size_divisor = size_divisor
        self.pad_mode = pad_mode
        self.amp = amp

    def prepare(self, image: np.ndarray) -> np.ndarray | None:
        """The work that can run on a decode thread: the working-size copy for ``resize`` (else None)."""
        return resize_image(image, self.size) if self.protocol == "resize" else None

    def run(self, items: Iterable[Item]) -> Iterator[tuple[Any, Prediction]]:
        """``(payload, Prediction at the image's original size)`` for every item, in order."""
        if self.protocol == "resize":
            batches = group_batches(items, key=lambda it: None, size=lambda it: 1, max_items=self.batch_size)
        elif self.protocol == "whole":
            batches = group_batches(items, key=lambda it: it[0].shape, size=lambda it: it[0].shape[0] * it[0].shape[1],
                                    max_items=self.batch_size, max_size=MAX_WHOLE_PIXELS)
        else:
            batches = ([it] for it in items)
        for batch in batches:
            yield from self._predict(batch)

    def _predict(self, batch: list[Item]) -> Iterator[tuple[Any, Prediction]]:
        if self.protocol == "resize":
            prepared = [p if p is not None else self.prepare(img) for img, p, _ in batch]
            probs = self._check(predict_batch(self.model, to_input(np.stack(prepared)).to(self.device), amp=self.amp))
            for k, (image, _, payload) in enumerate(batch):
                p = probs[k:k + 1]
                if image.shape[:2] != self.size:
                    with torch.inference_mode():
                        p = F.interpolate(p, size=image.shape[:2], mode="bilinear", align_corners=False)
                yield payload, Prediction(p[0])
        elif self.protocol == "whole":
            x = to_input(np.stack([img for img, _, _ in batch])).to(self.device)
            probs = self._check(_predict_whole(self.model, x, self.size_divisor, self.pad_mode, self.amp))
            for k, (_, _, payload) in enumerate(batch):
                yield payload, Prediction(probs[k])
        else:
            for image, _, payload in batch:
                yield payload, predict_probs(
                    self.model, image, protocol=self.protocol, size=self.size, window=self.window,
                    stride=self.stride, num_classes=self.num_classes, device=self.device,
                    size_divisor=self.size_divisor, pad_mode=self.pad_mode, batch_size=self.batch_size, amp=self.amp)

    def _check(self, probs: torch.Tensor) -> torch.Tensor:
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"the model returns {probs.shape[1]} channels; the task has {self.num_classes} classes")
        return probs
