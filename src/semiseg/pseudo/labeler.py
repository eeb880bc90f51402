"""The labeler: a model's softmax probabilities on unlabeled images, with ST++-style test-time augmentation.

TTA follows ST++'s ``BaseNet.forward(tta=True)``: for every scale the (normalised) input is resized with
``bilinear, align_corners=True`` to ``int(h·s) × int(w·s)``, predicted with and without a horizontal
flip, softmaxed, flipped back, resized back to ``h × w`` with ``bilinear, align_corners=True`` and the
views are **summed**. ``normalise=True`` (default) divides the sum by the number of views: the argmax
is unchanged and the maximum probability becomes a confidence in [0, 1] that selection policies can
threshold. ``normalise=False`` returns ST++'s raw sum.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.data.normalization import pad_with_mean


class Labeler:
    """Turns a segmentation model into probabilities ``B×C×H×W`` for pseudo labelling.

    ``train_mode=False`` (default) runs the model in eval mode; ``True`` reproduces the polyp repo,
    whose teacher labels in train mode (batch-statistics BN, active dropout, BN running stats
    updated). The model's own mode is restored after every call. ``size_divisor`` pads each scaled
    view (bottom/right, the model's mean colour, zero once normalised) to a multiple of it for models that need
    it (most smp encoders need 32) and crops the logits back; ``None`` feeds the view as is (ST++).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        amp: bool = False,
        normalise: bool = True,
        train_mode: bool = False,
        size_divisor: int | None = None,
    ) -> None:
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive, got {tuple(scales)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.amp = bool(amp)
        self.normalise = bool(normalise)
        self.train_mode = bool(train_mode)
        self.size_divisor = size_divisor

    @property
    def num_views(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def params(self) -> dict[str, Any]:
        """The TTA settings, for the pseudo-label store's provenance."""
        return {"scales": list(self.scales), "flip": self.flip, "normalise": self.normalise,
                "train_mode": self.train_mode, "size_divisor": self.size_divisor, "amp": self.amp,
                "resize": "bilinear, align_corners=True", "views": self.num_views}

    def _forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.size_divisor and self.size_divisor > 1:
            d = self.size_divisor
            x = pad_with_mean(self.model, x, (0, (-w) % d, 0, (-h) % d))
        autocast = torch.autocast(self.device.type, enabled=True) if self.amp else nullcontext()
        with autocast:
            logits = self.model(x)
        if isinstance(logits, dict):  # torchvision-style models return {"out": ...}
            logits = logits["out"]
        return logits[..., :h, :w].float()

    @torch.no_grad()
    def probs(self, images: Tensor) -> Tensor:
        """Softmax probabilities ``B×C×H×W`` (float32, on ``device``) of normalised images ``B×3×H×W``."""
        if images.ndim != 4:
            raise ValueError(f"images must be B×3×H×W, got {tuple(images.shape)}")
        was_training = self.model.training
        self.model.train(self.train_mode)
        try:
            x = images.to(self.device, dtype=torch.float32)
            h, w = x.shape[-2:]
            total: Tensor | None = None
            for s in self.scales:
                size = (int(h * s), int(w * s))
                view = x
                if size != (h, w):
                    view = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
                flips = (False, True) if self.flip else (False,)
                for flipped in flips:
                    inp = view.flip(3) if flipped else view
                    p = self._forward(inp).softmax(dim=1)
                    if flipped:
                        p = p.flip(3)
                    if size != (h, w):
                        p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=True)
                    total = p if total is None else total + p
            assert total is not None
            return total / self.num_views if self.normalise else total
        finally:
            self.model.train(was_training)

    def iter_predictions(
        self, images: np.ndarray | Sequence[np.ndarray], indices: Sequence[int] | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(index, probs C×H×W float32)`` for uint8 RGB images ``N×H×W×3`` (e.g. a memmap).

        Streams ``batch_size`` images at a time, so memory stays bounded by one batch whatever N is;
        images go to the model as ``semiseg.data.transforms.to_input`` makes them. A batch whose images differ in
        size is predicted one image at a time.
        """
        from semiseg.data.transforms import to_input

        order = list(range(len(images))) if indices is None else [int(i) for i in indices]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            arrays = [np.asarray(images[i]) for i in chunk]
            groups = [list(zip(chunk, arrays, strict=True))]
            if len({a.shape for a in arrays}) > 1:
                groups = [[(i, a)] for i, a in zip(chunk, arrays, strict=True)]
            for group in groups:
                batch = to_input(np.stack([a for _, a in group]))
                out = self.probs(batch).cpu().numpy().astype(np.float32, copy=False)
                for k, (i, _) in enumerate(group):
                    yield i, out[k]
