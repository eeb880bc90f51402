"""Augmentations keep image and mask aligned, put 255 only where they should, and are seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from semiseg.data.datasets import RepeatSampler, SegmentationDataset, oversampled_indices, repeat_to
from semiseg.data.transforms import (
    cutmix_batch,
    from_input,
    polyp_labeled_transform,
    polyp_paper_transform,
    sample_cutout_box,
    strong_transform,
    to_input,
    weak_transform,
)
from semiseg.errors import ConfigError

COLORS = np.array([(200, 0, 0), (0, 200, 0), (0, 0, 200)], dtype=np.uint8)


def block_pair(h: int = 64, w: int = 64, block: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour encodes its mask: blocks of class 0/1/2 drawn as one-hot colours.

    A blend of two or three one-hot colours is never one of them, so a pixel that still has an exact
    class colour after a transform was not mixed with another class, and its mask must be that class.
    """
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3, size=(h // block + 1, w // block + 1))
    mask = np.kron(classes, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    return COLORS[mask], mask


def pure_class(image: np.ndarray) -> np.ndarray:
    """Class of every pixel that is exactly a class colour, -1 elsewhere."""
    out = np.full(image.shape[:2], -1)
    for c, col in enumerate(COLORS):
        out[(image == col).all(axis=2)] = c
    return out


GEOMETRIC = {
    "weak-uniform": lambda: weak_transform((64, 64)),
    "weak-gta": lambda: weak_transform((64, 64), scale_mode="gta"),
    "weak-rect": lambda: weak_transform((40, 56), scale=(0.7, 1.6)),
    "polyp-labeled": polyp_labeled_transform,
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_geometric_transforms_keep_image_and_mask_aligned(name: str) -> None:
    t = GEOMETRIC[name]()
    image, mask = block_pair()
    checked = 0
    for seed in range(25):
        out, m = t(image, mask, np.random.default_rng(seed))
        assert out.shape[:2] == m.shape and out.dtype == np.uint8 and m.dtype == np.uint8
        pure = pure_class(out)
        sel = pure >= 0
        np.testing.assert_array_equal(m[sel], pure[sel])
        pad = (out == 0).all(axis=2)
        assert np.all(m[pad] == 255) and np.all(m[~pad] != 255), "255 exactly where the image is padding"
        checked += sel.sum()
    assert checked > 0.5 * 25 * 64 * 40  # most pixels are interior, so the check is not vacuous


def test_polyp_paper_transform_keeps_alignment_under_photometric_changes() -> None:
    # RGBShift / brightness-contrast change colours but not which channel is largest; away from block
    # edges (5×5 neighbourhood of one class in the output mask) the image must show that class's channel.
    t = polyp_paper_transform()
    image, mask = block_pair(64, 64, block=16)
    for seed in range(25):
        out, m = t(image, mask, np.random.default_rng(seed))
        assert out.shape == image.shape and set(np.unique(m)) <= {0, 1, 2}  # reflect border: no padding
        win = np.lib.stride_tricks.sliding_window_view(m, (5, 5))
        interior = (win == win[..., 2:3, 2:3]).all(axis=(-1, -2))
        centre = out[2:-2, 2:-2].astype(int).argmax(axis=2)
        np.testing.assert_array_equal(centre[interior], m[2:-2, 2:-2][interior])
        assert interior.mean() > 0.3


def test_weak_transform_pads_mask_with_pad_label() -> None:
    image, mask = block_pair()
    mask = mask + 1  # classes 1..3 so that a pad label of 0 is distinguishable
    t = weak_transform((64, 64), scale=(0.5, 0.6), pad_label=0)
    out, m = t(image, mask, np.random.default_rng(3))
    pad = (out == 0).all(axis=2)
    assert pad.any() and np.all(m[pad] == 0) and np.all(m[~pad] > 0) and not np.any(m == 255)


def test_weak_scale_modes_follow_their_distributions() -> None:
    # Measure the scale factor through the size of the content before padding: with scale < 1 the
    # unpadded region is s·64 wide.
    image = np.full((64, 64, 3), 90, np.uint8)

    def factors(t: object) -> list[float]:
        out = []
        for seed in range(300):
            img, _ = t(image, None, np.random.default_rng(seed))  # type: ignore[operator]
            content = (img != 0).any(axis=2)
            out.append(content.any(axis=0).sum() / 64)
        return out

    gta = np.array(factors(weak_transform((64, 64), scale=(0.5, 2.0), scale_mode="gta", hflip=False)))
    uni = np.array(factors(weak_transform((64, 64), scale=(0.5, 2.0), hflip=False)))
    # GTA: P(s < 1) = 0.5; uniform on [0.5, 2]: P(s < 1) = 1/3.
    assert abs((gta < 0.99).mean() - 0.5) < 0.1
    assert abs((uni < 0.99).mean() - 1 / 3) < 0.1
    assert gta.min() >= 0.45


def test_strong_transform_never_moves_pixels_and_cuts_out_with_255() -> None:
    t = strong_transform()
    yy, xx = np.mgrid[:64, :64]
    bright = ((yy // 16 + xx // 16) % 2).astype(bool)
    image = np.where(bright[..., None], 180, 60).astype(np.uint8).repeat(3, axis=2)
    mask = bright.astype(np.uint8)
    edge = (np.minimum(yy % 16, 15 - yy % 16) < 4) | (np.minimum(xx % 16, 15 - xx % 16) < 4)
    boxes = 0
    for seed in range(40):
        out, m = t(image, mask, np.random.default_rng(seed))
        assert out.shape == image.shape and m.shape == mask.shape
        box = m == 255
        if box.any():
            boxes += 1
            ys, xs = np.nonzero(box)
            rect = np.zeros_like(box)
            rect[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
            np.testing.assert_array_equal(box, rect)  # one axis-aligned box
        np.testing.assert_array_equal(m[~box], mask[~box])  # the mask is otherwise untouched
        grey = out.astype(int).mean(axis=2)
        keep = ~box & ~edge
        assert grey[keep & bright].min() > grey[keep & ~bright].max()  # the pattern did not move
    assert 8 <= boxes <= 32  # p 0.5


def test_cutout_box_follows_st_plus_plus_rule() -> None:
    h = w = 200
    rng = np.random.default_rng(0)
    for _ in range(300):
        y, x, bh, bw = sample_cutout_box(h, w, rng)
        assert 0 <= y and y + bh <= h and 0 <= x and x + bw <= w
        assert 0.015 <= bh * bw / (h * w) <= 0.4
        assert 0.25 <= bh / bw <= 1 / 0.25
    t = strong_transform(p_cutout=1.0, p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    image = np.full((h, w, 3), 7, np.uint8)
    out, m = t(image, np.zeros((h, w), np.uint8), np.random.default_rng(1))
    inside = out[m == 255]
    assert inside.std() > 50 and inside.min() < 30 and inside.max() > 225  # per-pixel noise in [0, 255]
    assert np.all(out[m != 255] == 7)


def test_polyp_transforms_reject_non_square_sizes() -> None:
    image, mask = block_pair(32, 48)
    with pytest.raises(ConfigError, match="square"):
        polyp_labeled_transform()(image, mask, np.random.default_rng(0))


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        weak_transform((64, 64), scale_mode="log")
    with pytest.raises(ConfigError):
        weak_transform((64, 64), scale=(1.2, 2.0), scale_mode="gta")
    with pytest.raises(ConfigError):
        weak_transform((0, 64))


def test_to_input_matches_hand_computed_values_and_inverts() -> None:
    img = np.zeros((2, 3, 3), np.uint8)
    img[1, 2] = (255, 0, 128)
    t = to_input(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    np.testing.assert_allclose(t[:, 1, 2].numpy(), [1.0, 0.0, 128 / 255], rtol=1e-6)
    rnd = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(from_input(to_input(rnd)), rnd)


def _box_of(diff: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(diff, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    assert bool(diff[y0:y1, x0:x1].all()) and int(diff.sum()) == (y1 - y0) * (x1 - x0), "one rectangle"
    return y0, x0, y1 - y0, x1 - x0


def test_cutmix_pastes_one_half_area_box_from_the_next_sample() -> None:
    b, h, w = 4, 16, 20
    g = torch.Generator().manual_seed(0)
    images = torch.rand((b, 3, h, w), generator=g)
    labels = torch.randint(0, 1000, (b, h, w), generator=g)
    conf = torch.rand((b, h, w), generator=g)
    gen = torch.Generator().manual_seed(5)
    mi, ml, mc = cutmix_batch(images, labels, conf, p=1.0, generator=gen)
    for i in range(b):
        j = (i + 1) % b
        box = (mi[i] != images[i]).any(dim=0)
        y, x, bh, bw = _box_of(box)
        assert w // 2 + 1 <= bw <= w - 1 and bh == round(h * w / 2 / bw)
        assert torch.equal(mi[i], torch.where(box, images[j], images[i]))
        assert torch.equal(ml[i], torch.where(box, labels[j], labels[i]))
        assert mc is not None and torch.equal(mc[i], torch.where(box, conf[j], conf[i]))
    # same generator state -> same result; p=0 -> inputs returned untouched
    again = cutmix_batch(images, labels, conf, p=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[0], mi) and torch.equal(again[1], ml)
    same = cutmix_batch(images, labels, None, p=0.0, generator=gen)
    assert same[0] is images and same[1] is labels and same[2] is None


def test_cutmix_probability_is_per_batch() -> None:
    images, labels = torch.rand((2, 3, 8, 8)), torch.zeros((2, 8, 8), dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    mixed = sum(cutmix_batch(images, labels, p=0.5, generator=gen)[0] is not images for _ in range(200))
    assert 70 <= mixed <= 130


def _arrays(n: int = 6, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    pairs = [block_pair(size, size, 4, seed=i) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _dataset(seed: int = 0) -> SegmentationDataset:
    images, masks = _arrays()
    return SegmentationDataset(images, masks, [5, 1, 3, 0], weak_transform((24, 24)),
                               strong=strong_transform(), seed=seed)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_dataset_items_are_pure_functions_of_seed_epoch_and_index() -> None:
    d1, d2 = _dataset(), _dataset()
    for k in range(4):
        a = d1[k]
        assert _equal(a, d2[k]) and _equal(a, d1[k])  # no hidden state advances between calls
        assert a["index"] == [5, 1, 3, 0][k]
        assert a["image"].shape == (3, 24, 24) and a["mask"].dtype == torch.long
        strong_ignored = (a["mask_strong"] == 255) & (a["mask"] != 255)
        assert torch.equal(a["mask_strong"][~strong_ignored], a["mask"][~strong_ignored])
    d2.set_epoch(1)
    assert not _equal(d1[0], d2[0])
    assert _equal(d1[4 + 2], d2[2])  # index k + len means the next epoch
    assert not _equal(d1[0], _dataset(seed=1)[0])


def test_dataloader_output_does_not_depend_on_workers_and_resume_replays() -> None:
    def batches(workers: int, start: int, count: int) -> list[dict]:
        ds = _dataset()
        sampler = RepeatSampler(len(ds), seed=7, start=start, num_samples=count)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers)
        return list(loader)

    full = batches(0, 0, 12)  # three passes over four items
    with_workers = batches(2, 0, 12)
    resumed = batches(0, 6, 6)
    for a, b in zip(full, with_workers, strict=True):
        assert _equal(a, b)
    for a, b in zip(full[3:], resumed, strict=True):
        assert _equal(a, b)


def test_repeat_sampler_visits_every_item_once_per_pass_and_shards() -> None:
    s = list(RepeatSampler(5, seed=3, num_samples=15))
    for c in range(3):
        assert sorted(s[5 * c:5 * c + 5]) == [5 * c + i for i in range(5)]
    r0 = list(RepeatSampler(5, seed=3, num_samples=5, rank=0, world_size=2))
    r1 = list(RepeatSampler(5, seed=3, num_samples=5, rank=1, world_size=2))
    assert r0 == s[0:10:2] and r1 == s[1:10:2]


def test_oversampling_repeats_labeled_evenly() -> None:
    out = oversampled_indices([10, 11, 12], 10, np.random.default_rng(0))
    counts = {i: out.count(i) for i in (10, 11, 12)}
    assert len(out) == 10 and sorted(counts.values()) == [3, 3, 4]
    assert oversampled_indices([1, 2, 3], 2) == [1, 2, 3]
    assert oversampled_indices([1, 2], 5) == [1, 1, 1, 2, 2]
    assert repeat_to([1, 2, 3], 10) == [1, 2, 3] * 4
