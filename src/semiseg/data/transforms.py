"""Augmentations, normalisation and batch CutMix.

Every random transform here is a *pair transform*: ``t(image, mask, rng) -> (image, mask)`` with an
explicit ``np.random.Generator``. Nothing draws from a global or per-object random state, so an
output is a pure function of the generator it is handed; :class:`~semiseg.data.datasets.SegmentationDataset`
seeds that generator from ``(seed, epoch, index)``, which makes augmentation independent of DataLoader
workers and of how many samples were drawn before (a resumed run replays an uninterrupted one).

Geometric ops move image and mask together (image: linear/area, mask: nearest); photometric ops touch
the image only. Images are uint8 H×W×3, masks uint8 H×W with 255 = ignore.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

import albumentations as A
import cv2
import numpy as np
import torch

from semiseg.data.classes import IGNORE_INDEX
from semiseg.errors import ConfigError


class PairTransform(Protocol):
    """What datasets call: a random map of (image, mask) driven only by ``rng``."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]: ...


class AlbuPair:
    """An albumentations pipeline whose randomness comes only from the generator passed per call.

    albumentations >= 2 keeps a numpy and a Python RNG on every transform; ``set_random_state`` points
    all of them at generators derived from ``rng`` before each call.
    """

    def __init__(self, transforms: Sequence[A.BasicTransform | A.BaseCompose], *, square_only: str = ""):
        self.compose = A.Compose(list(transforms), p=1.0)
        self.square_only = square_only

    def __call__(self, image: np.ndarray, mask: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        if self.square_only and image.shape[0] != image.shape[1]:
            raise ConfigError(f"{self.square_only} needs a square working size "
                              f"(RandomRotate90 swaps H and W); got {image.shape[0]}x{image.shape[1]}")
        self.compose.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        out = self.compose(image=image) if mask is None else self.compose(image=image, mask=mask)
        return out["image"], out.get("mask")

    def __repr__(self) -> str:
        return f"AlbuPair({[type(t).__name__ for t in self.compose.transforms]})"


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ConfigError(f"crop size must be two positive integers (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def weak_transform(size: Sequence[int], *, scale: tuple[float, float] | None = (0.5, 2.0),
                   pad_label: int = IGNORE_INDEX, hflip: bool = True, vflip: bool = False,
                   scale_mode: str = "uniform") -> AlbuPair:
    """Random scale, pad to ``size`` (image 0, mask ``pad_label``), random crop ``size``, flips.

    ``vflip`` adds a vertical flip (p 0.5): natural for endoscopy and microscopy, wrong for street scenes.

    ``scale_mode="uniform"``: factor ~ U(scale); ``"gta"``: GTA-Seg's RandResize, with p 0.5 U(lo, 1) else
    U(1, hi), so the factor is *not* uniform on [lo, hi]. ``scale=None`` skips scaling. ST++ pads the
    label with 255, GTA-Seg with 0 (background): ``pad_label`` chooses.
    """
    h, w = _check_size(size)
    ops: list[A.BasicTransform | A.BaseCompose] = []
    if scale is not None:
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi:
            raise ConfigError(f"scale range must satisfy 0 < lo <= hi, got {scale!r}")

        def rescale(a: float, b: float) -> A.RandomScale:
            return A.RandomScale(scale_limit=(a - 1.0, b - 1.0), interpolation=cv2.INTER_LINEAR,
                                 mask_interpolation=cv2.INTER_NEAREST_EXACT, area_for_downscale="image",
                                 p=1.0)

        if scale_mode == "uniform":
            ops.append(rescale(lo, hi))
        elif scale_mode == "gta":
            if not lo <= 1.0 <= hi:
                raise ConfigError(f"scale_mode 'gta' needs lo <= 1 <= hi, got {scale!r}")
            ops.append(A.OneOf([rescale(lo, 1.0), rescale(1.0, hi)], p=1.0))  # equal weights: p 0.5 each
        else:
            raise ConfigError(f"scale_mode must be 'uniform' or 'gta', got {scale_mode!r}")
    if not 0 <= pad_label <= 255:
        raise ConfigError(f"pad_label must be in 0..255, got {pad_label}")
    ops += [A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0,
                          fill_mask=pad_label, p=1.0),
            A.RandomCrop(height=h, width=w, p=1.0)]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if vflip:
        ops.append(A.VerticalFlip(p=0.5))
    return AlbuPair(ops)


def sample_cutout_box(height: int, width: int, rng: np.random.Generator, *,
                      area: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.3, 1 / 0.3),
                      redraw_area: bool = True) -> tuple[int, int, int, int]:
    """ST++'s cutout box ``(y, x, h, w)``: area U(area)·HW, aspect h/w ~ U(ratio), top-left uniform.

    Like ST++, a draw whose box does not fit at its top-left corner is rejected and redrawn (so large
    boxes lie towards the top-left less often than uniform placement would give); after 100 misses the
    box is clipped to the image. ``redraw_area=False`` keeps the first area and redraws only aspect and
    place (UniMatch's ``obtain_cutmix_box``).
    """
    a = rng.uniform(*area) * height * width
    for attempt in range(100):
        if redraw_area and attempt > 0:
            a = rng.uniform(*area) * height * width
        r = rng.uniform(*ratio)
        bw, bh = max(1, int(math.sqrt(a / r))), max(1, int(math.sqrt(a * r)))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if x + bw <= width and y + bh <= height:
            return y, x, bh, bw
    bh, bw = min(bh, height), min(bw, width)
    return height - bh, width - bw, bh, bw


class StrongTransform:
    """ST++'s strong augmentation of an (already weakly augmented) view; geometry is never changed.

    p ``p_jitter`` ColorJitter(``jitter``), p ``p_gray`` grayscale, p ``p_blur`` Gaussian blur with
    σ ~ U(``blur_sigma``), then p ``p_cutout`` one cutout box filled with per-pixel random values in
    [0, 255] whose mask pixels become ``ignore_label``.
    """

    def __init__(self, *, jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
                 p_jitter: float = 0.8, p_gray: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 2.0),
                 p_blur: float = 0.5, p_cutout: float = 0.5, cutout_area: tuple[float, float] = (0.02, 0.4),
                 cutout_ratio: tuple[float, float] = (0.3, 1 / 0.3), ignore_label: int = IGNORE_INDEX):
        b, c, s, hue = jitter
        self.photometric = AlbuPair([
            A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=hue, p=p_jitter),
            A.ToGray(num_output_channels=3, method="weighted_average", p=p_gray),
            A.GaussianBlur(blur_limit=0, sigma_limit=blur_sigma, p=p_blur),
        ])
        self.p_cutout, self.cutout_area, self.cutout_ratio = p_cutout, cutout_area, cutout_ratio
        self.ignore_label = ignore_label

    def __call__(self, image: np.ndarray, mask: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        out, _ = self.photometric(image, None, rng)
        out = np.array(out, dtype=np.uint8, copy=True)
        mask = None if mask is None else np.array(mask, copy=True)
        if rng.random() < self.p_cutout:
            y, x, bh, bw = sample_cutout_box(out.shape[0], out.shape[1], rng, area=self.cutout_area,
                                             ratio=self.cutout_ratio)
            out[y:y + bh, x:x + bw] = rng.integers(0, 256, size=(bh, bw, out.shape[2]), dtype=np.uint8)
            if mask is not None:
                mask[y:y + bh, x:x + bw] = self.ignore_label
        return out, mask


def strong_transform(**options: object) -> StrongTransform:
    """ST++'s strong augmentation for unlabeled images (see :class:`StrongTransform` for the options)."""
    return StrongTransform(**options)  # type: ignore[arg-type]


def _polyp_paper_geometry(border_mode: int) -> list[A.BasicTransform]:
    return [A.Affine(scale=(0.8, 1.2), translate_percent={"x": (-0.2, 0.2), "y": (-0.2, 0.2)}, rotate=(-30, 30),
                     shear=(0, 0), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                     border_mode=border_mode, fill=0, fill_mask=IGNORE_INDEX, p=0.5),
            A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]


def _polyp_paper_noise() -> list[A.BasicTransform]:
    return [A.RGBShift(r_shift_limit=25, g_shift_limit=25, b_shift_limit=25, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.5)]


def polyp_paper_transform(*, border_mode: int = cv2.BORDER_REFLECT_101) -> AlbuPair:
    """The polyp paper's augmentation of unlabeled images.

    ShiftScaleRotate(shift 0.2, scale 0.2, rotate 30, p 0.5) — written as the equivalent ``Affine``
    (albumentations 2 deprecates ShiftScaleRotate) with the reflect border the paper's albumentations
    used by default — RGBShift(25, p 0.5), RandomBrightnessContrast(0.3, 0.3, p 0.5), VerticalFlip p 0.5,
    RandomRotate90 p 0.5. Needs a square working size.
    """
    affine, vflip, rot90 = _polyp_paper_geometry(border_mode)
    return AlbuPair([affine, *_polyp_paper_noise(), vflip, rot90], square_only="polyp_paper_transform")


def polyp_paper_geometry(*, border_mode: int = cv2.BORDER_REFLECT_101) -> AlbuPair:
    """The geometric part of :func:`polyp_paper_transform` (affine, flip, rot90): a view the teacher and the
    student share, so that a teacher's labels of it line up with the student's noised copy pixel for pixel."""
    return AlbuPair(_polyp_paper_geometry(border_mode), square_only="polyp_paper_geometry")


def polyp_paper_noise() -> AlbuPair:
    """The photometric part of :func:`polyp_paper_transform` (RGB shift, brightness / contrast): the input
    noise of the student's view, applied on top of the shared geometry (mask untouched)."""
    return AlbuPair(_polyp_paper_noise())


def polyp_labeled_transform() -> AlbuPair:
    """The polyp paper's augmentation of labeled images: VerticalFlip p 0.5, RandomRotate90 p 0.5."""
    return AlbuPair([A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)], square_only="polyp_labeled_transform")


def to_input(image: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 (or N×H×W×3) RGB -> float32 3×H×W (N×3×H×W) on [0, 1]: the model input.

    The mean/std normalisation belongs to the model (its encoder's pretraining decides it), which applies it
    itself: see :mod:`semiseg.data.normalization`."""
    # np.array copies: cached images are read-only memmaps, which torch cannot wrap without a warning
    t = torch.from_numpy(np.array(image, copy=True))
    if t.dtype != torch.uint8 or t.shape[-1] != 3:
        raise ValueError(f"to_input expects uint8 ...×H×W×3, got {t.dtype} {tuple(t.shape)}")
    return t.movedim(-1, -3).to(torch.float32).div_(255.0).contiguous()


def from_input(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_input` for display: 3×H×W (or N×3×H×W) float -> uint8 H×W×3 (N×H×W×3)."""
    t = tensor.detach().to("cpu", torch.float32).mul(255.0).round_().clamp_(0, 255)
    return t.to(torch.uint8).movedim(-3, -1).contiguous().numpy()


def cutmix_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """GTA-Seg's (U2PL's) CutMix box ``(y, x, h, w)``: area H·W/2, ``w = randint(W/2 + 1, W)`` with the
    high end exclusive as in numpy's randint, ``h = round(area / w)``, top-left uniform over valid places."""
    dev = generator.device
    lo = width // 2 + 1
    bw = int(torch.randint(lo, max(width, lo + 1), (1,), generator=generator, device=dev)) if width > 1 else 1
    bw = min(bw, width)
    bh = min(height, max(1, round(height * width / 2 / bw)))
    x = int(torch.randint(0, width - bw + 1, (1,), generator=generator, device=dev))
    y = int(torch.randint(0, height - bh + 1, (1,), generator=generator, device=dev))
    return y, x, bh, bw


def cutmix_batch(images: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor | None = None, *,
                 p: float = 0.5, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GTA-Seg's CutMix on a batch: with probability ``p`` (one draw for the whole batch) every sample i
    gets one :func:`cutmix_box` pasted from sample (i + 1) % B, mixing image, label and confidence alike.

    ``images`` B×C×H×W, ``labels`` B×H×W, ``confidence`` B×H×W; any device (random numbers come from
    ``generator`` on its own device). Returns new tensors when mixed, the inputs unchanged otherwise.
    """
    if images.ndim != 4 or labels.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"cutmix_batch: images B×C×H×W and labels B×H×W, got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    if confidence is not None and confidence.shape != labels.shape:
        raise ValueError("cutmix_batch: confidence must be shaped like labels, "
                         f"got {tuple(confidence.shape)}")
    if float(torch.rand((1,), generator=generator, device=generator.device)) >= p:
        return images, labels, confidence
    b, _, h, w = images.shape
    box = torch.zeros((b, h, w), dtype=torch.bool, device=images.device)
    for i in range(b):
        y, x, bh, bw = cutmix_box(h, w, generator)
        box[i, y:y + bh, x:x + bw] = True
    mixed_confidence = None if confidence is None else paste_from_next(box, confidence)
    return paste_from_next(box, images), paste_from_next(box, labels), mixed_confidence


def cutmix_boxes(batch: int, height: int, width: int, rng: np.random.Generator, *, p: float = 0.5,
                 area: tuple[float, float] = (0.02, 0.4),
                 ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """UniMatch's CutMix boxes (``obtain_cutmix_box``), ``batch``×H×W bool, True inside a box: each image on its
    own gets a box with probability ``p``, of area U(area)·HW drawn once, aspect h/w ~ U(ratio) and a uniform
    top-left, aspect and place redrawn until it fits (:func:`sample_cutout_box` with ``redraw_area=False``)."""
    boxes = torch.zeros((batch, height, width), dtype=torch.bool)
    for i in range(batch):
        if rng.random() < p:
            y, x, bh, bw = sample_cutout_box(height, width, rng, area=area, ratio=ratio, redraw_area=False)
            boxes[i, y:y + bh, x:x + bw] = True
    return boxes


def paste_from_next(box: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """CutMix within a batch: sample i with sample (i + 1) % B inside ``box[i]`` (B×H×W bool)."""
    return paste_boxes(box, batch, torch.roll(batch, -1, dims=0))


def paste_boxes(box: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """CutMix: ``target`` with ``source`` inside ``box`` (B×H×W bool); images B×C×H×W or maps B×H×W alike."""
    sel = box.to(target.device)
    return torch.where(sel if target.ndim == 3 else sel[:, None], source, target)
