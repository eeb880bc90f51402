"""Training datasets over in-memory or memmapped arrays, and samplers.

Randomness contract: the augmentation of dataset item ``k`` is a pure function of ``(seed, epoch, k)``
(``np.random.SeedSequence([seed, epoch, k])``), never of a worker's or a transform's running state.
An index ``k >= len(dataset)`` means item ``k % len`` in epoch ``epoch + k // len``; that is how
:class:`RepeatSampler` walks through epochs without anyone calling ``set_epoch`` inside DataLoader
workers (which hold copies of the dataset). So a run resumed at sampler position ``start`` sees exactly
the batches an uninterrupted run would have seen, whatever ``num_workers`` is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from semiseg.data.transforms import PairTransform, to_input


class SegmentationDataset(Dataset):
    """Items ``indices[k]`` of ``images`` (N×H×W×3 uint8) and ``masks`` (N×H×W uint8 or None).

    ``__getitem__`` returns ``image`` (weak view on [0, 1]), ``mask`` (long H×W, when masks are given),
    ``index`` (position in the arrays), and with ``strong``: ``image_strong`` (strong applied to the weak
    view, same geometry) and ``mask_strong`` (the weak mask with the strong view's ignore pixels, e.g.
    255 inside a cutout box). ``masks`` may be ground truth or a pseudo-label store's array.

    ``strong_views`` > 1 adds independent strong views of the same weak view: ``image_strong2`` /
    ``mask_strong2``, ... (UniMatch's two strong streams), each from a generator of its own.
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray | None, indices: Sequence[int],
                 transform: PairTransform | None, *, strong: PairTransform | None = None, strong_views: int = 1,
                 seed: int = 0):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 N×H×W×3, got {images.dtype} {images.shape}")
        if masks is not None and (masks.shape != images.shape[:3] or masks.dtype != np.uint8):
            raise ValueError(f"masks must be uint8 {images.shape[:3]}, got {masks.dtype} {masks.shape}")
        self.indices = [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < len(images)]
        if bad:
            raise IndexError(f"indices out of range 0..{len(images) - 1}: {bad[:5]}")
        self.images, self.masks = images, masks
        if strong_views < 1:
            raise ValueError(f"strong_views must be >= 1, got {strong_views}")
        self.transform, self.strong, self.strong_views = transform, strong, int(strong_views)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Base epoch of the augmentation seeds (call before creating the DataLoader's iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def rngs(self, k: int) -> tuple[np.random.Generator, ...]:
        """The weak generator of item ``k``, then one per strong view (see the module docstring); a spawned
        child depends only on its position, so adding views leaves the first ones' draws unchanged."""
        n = len(self.indices)
        cycle, pos = divmod(int(k), n)
        children = np.random.SeedSequence([self.seed, self.epoch + cycle, pos]).spawn(1 + self.strong_views)
        return tuple(np.random.default_rng(c) for c in children)

    def __getitem__(self, k: int) -> dict[str, Any]:
        if k < 0:
            raise IndexError(f"negative index {k}")
        idx = self.indices[int(k) % len(self.indices)]
        weak_rng, *strong_rngs = self.rngs(k)
        image = np.array(self.images[idx])
        mask = None if self.masks is None else np.array(self.masks[idx])
        if self.transform is not None:
            image, mask = self.transform(image, mask, weak_rng)
        item: dict[str, Any] = {"image": to_input(image), "index": idx}
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long()
        for v, strong_rng in enumerate(strong_rngs if self.strong is not None else []):
            s_image, s_mask = self.strong(image, mask, strong_rng)  # type: ignore[misc]
            suffix = "" if v == 0 else str(v + 1)
            item[f"image_strong{suffix}"] = to_input(s_image)
            if s_mask is not None:
                item[f"mask_strong{suffix}"] = torch.from_numpy(np.ascontiguousarray(s_mask)).long()
        return item


def oversampled_indices(labeled: Sequence[int], target_len: int,
                        rng: np.random.Generator | None = None) -> list[int]:
    """``labeled`` repeated to ``target_len`` entries (e.g. the unlabeled count) for 1:1 batches.

    Every entry appears ``target_len // L`` times and ``target_len % L`` of them (chosen by ``rng``, or the
    first ones without) once more, so no labeled image is favoured beyond one extra copy. With
    ``target_len <= L`` the list is returned whole: oversampling never drops labeled data. Order is kept
    (shuffling is the sampler's job).
    """
    labeled = [int(i) for i in labeled]
    if not labeled:
        raise ValueError("oversampled_indices: empty labeled list")
    n = len(labeled)
    if target_len <= n:
        return list(labeled)
    reps, extra = divmod(int(target_len), n)
    chosen = set(range(extra)) if rng is None else {int(i) for i in rng.choice(n, size=extra, replace=False)}
    out: list[int] = []
    for j, i in enumerate(labeled):
        out += [i] * (reps + (j in chosen))
    return out


def repeat_to(labeled: Sequence[int], target_len: int) -> list[int]:
    """ST++'s list: ``labeled * ceil(target_len / L)`` (all copies, at least ``target_len`` entries)."""
    labeled = [int(i) for i in labeled]
    if not labeled:
        raise ValueError("repeat_to: empty labeled list")
    return labeled * max(1, math.ceil(target_len / len(labeled)))


class RepeatSampler(Sampler[int]):
    """Endless (or ``num_samples``-long) shuffled passes over a dataset of length ``n``.

    Position ``p`` of the stream is item ``perm_c[p % n] + c·n`` with ``c = p // n`` and ``perm_c`` the
    permutation of pass ``c`` drawn from ``(seed, c)``; the ``+ c·n`` tells the dataset which epoch it is
    in (see :class:`SegmentationDataset`). ``start`` skips the first positions (resume); with several
    processes, rank ``r`` of ``world_size`` takes positions ``start + r, start + r + world_size, ...``.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, start: int = 0,
                 num_samples: int | None = None, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("RepeatSampler needs a non-empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.seed, self.shuffle, self.start = n, int(seed), shuffle, int(start)
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def permutation(self, cycle: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng(np.random.SeedSequence([self.seed, cycle])).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        p, count, cycle, perm = self.start + self.rank, 0, -1, np.arange(0)
        while self.num_samples is None or count < self.num_samples:
            c, j = divmod(p, self.n)
            if c != cycle:
                cycle, perm = c, self.permutation(c)
            yield int(perm[j]) + c * self.n
            p += self.world_size
            count += 1

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless RepeatSampler has no length; pass num_samples")
        return self.num_samples

