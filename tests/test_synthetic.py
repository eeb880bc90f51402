"""The synthetic generator: deterministic, exact masks, atomic cached output, both kinds, the preset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.data.presets import load_source
from semiseg.data.synthetic import generate_synthetic, render_sample, synthetic_params
from semiseg.errors import DataError


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_render_is_deterministic_and_seeded(kind: str) -> None:
    a_img, a_mask = render_sample(5, size=(40, 48), kind=kind, seed=1)
    b_img, b_mask = render_sample(5, size=(40, 48), kind=kind, seed=1)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert a_img.shape == (40, 48, 3) and a_img.dtype == np.uint8
    assert a_mask.shape == (40, 48) and a_mask.dtype == np.uint8
    c_img, _ = render_sample(5, size=(40, 48), kind=kind, seed=2)
    d_img, _ = render_sample(6, size=(40, 48), kind=kind, seed=1)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)


def test_binary_masks_and_variety() -> None:
    masks = [render_sample(i, size=(64, 64), kind="binary", seed=0)[1] for i in range(40)]
    assert set(np.unique(np.stack(masks))) == {0, 1}
    fractions = np.array([m.mean() for m in masks])
    assert (fractions == 0).sum() >= 2  # some images have no polyp at all
    assert fractions.max() > 0.15 and fractions[fractions > 0].min() < 0.03  # big and small polyps


def test_multiclass_all_classes_present() -> None:
    masks = np.stack([render_sample(i, size=(64, 64), kind="multiclass", seed=0)[1] for i in range(20)])
    assert set(np.unique(masks)) == {0, 1, 2, 3, 4}


def test_objects_are_not_identified_by_colour() -> None:
    """No per-pixel colour rule solves the binary task: the best linear colour threshold (LDA
    direction, best cut) reaches a low pooled Dice, so a model must use shape and context."""
    xs, ys = [], []
    for i in range(30):
        img, m = render_sample(i, size=(64, 64), kind="binary", seed=0)
        xs.append(img.reshape(-1, 3))
        ys.append(m.ravel())
    x, y = np.concatenate(xs).astype(float), np.concatenate(ys) == 1
    scatter = np.cov(x[y].T) + np.cov(x[~y].T)
    score = x @ np.linalg.solve(scatter, x[y].mean(0) - x[~y].mean(0))
    best = 0.0
    for t in np.quantile(score, np.linspace(0.01, 0.99, 99)):
        pred = score > t
        best = max(best, 2 * (pred & y).sum() / (pred.sum() + y.sum()))
    assert 0.05 < best < 0.4


def test_generate_writes_exact_pairs_and_reuses(tmp_path: Path) -> None:
    out = generate_synthetic(tmp_path / "set", n=12, size=(32, 40), kind="multiclass", seed=3)
    imgs, masks = sorted((out / "images").iterdir()), sorted((out / "masks").iterdir())
    assert [p.name for p in imgs] == [f"{i:04d}.png" for i in range(12)] == [p.name for p in masks]
    for i in (0, 7):
        img, mask = render_sample(i, size=(32, 40), kind="multiclass", seed=3)
        np.testing.assert_array_equal(np.asarray(Image.open(imgs[i])), img)
        stored = Image.open(masks[i])
        assert stored.mode == "L"
        np.testing.assert_array_equal(np.asarray(stored), mask)
    stamp = masks[0].stat().st_mtime_ns
    assert generate_synthetic(tmp_path / "set", n=12, size=(32, 40), kind="multiclass", seed=3) == out
    assert masks[0].stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left behind
    with pytest.raises(DataError, match="not a synthetic set"):
        generate_synthetic(tmp_path / "set", n=13, size=(32, 40), kind="multiclass", seed=3)
    other = generate_synthetic(tmp_path / "again", n=12, size=(32, 40), kind="multiclass", seed=3)
    assert (other / "masks" / "0005.png").read_bytes() == (out / "masks" / "0005.png").read_bytes()


def test_moderate_difficulty_keeps_the_geometry_and_makes_polyps_stand_out() -> None:
    hard_contrast, moderate_contrast = [], []
    for i in range(30):
        hard_img, hard_mask = render_sample(i, size=(64, 64))
        img, mask = render_sample(i, size=(64, 64), difficulty="moderate")
        for im, m, out in ((hard_img, hard_mask, hard_contrast), (img, mask, moderate_contrast)):
            if m.any() and (~m.astype(bool)).any():  # mean brightness inside the polyps over the rest
                grey = im.astype(np.float32).mean(axis=2)
                out.append(grey[m == 1].mean() / grey[m == 0].mean())
    assert min(moderate_contrast) > 1.0 and np.median(moderate_contrast) > np.median(hard_contrast) + 0.1
    assert min(hard_contrast) < 1.0  # hard: darker or camouflaged polyps too
    # the default is the generator as it always was: same parameters (cache key) and pixels
    assert synthetic_params(5, (64, 64), "binary", 0) == {"version": 1, "kind": "binary", "n": 5, "size": [64, 64],
                                                          "seed": 0}
    assert synthetic_params(5, (64, 64), "binary", 0, "moderate")["difficulty"] == "moderate"
    digest = hashlib.sha256()
    for kind in ("binary", "multiclass"):
        for i in range(8):
            digest.update(render_sample(i, size=(40, 48), kind=kind, seed=3)[1].tobytes())
    # masks of generator version 1 as drawn before `difficulty` existed (commit ce03ba0): the random stream that
    # places every object is unchanged, so cached sets stay valid. Masks are pure numpy; images go through
    # Pillow's filters, so pinning them would tie the test to a Pillow version.
    assert digest.hexdigest()[:16] == "29f6ed16305663c1"


def test_bad_parameters() -> None:
    with pytest.raises(DataError, match="difficulty 'easy' unknown"):
        render_sample(0, difficulty="easy")
    with pytest.raises(DataError, match="kind"):
        render_sample(0, kind="triangles")
    with pytest.raises(DataError, match="size"):
        generate_synthetic("unused", n=3, size=(4, 4))


@pytest.mark.parametrize("kind, names", [("binary", ("background", "polyp")),
                                         ("multiclass", ("background", "blob", "spotted", "bar", "star"))])
def test_synthetic_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                          names: tuple[str, ...]) -> None:
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    src = load_source("synthetic", kind=kind, n=10, size=(24, 32), seed=1)
    assert src.root is not None and src.root.parent == tmp_path / "cache" / "synthetic"
    assert src.classes.names == names and len(src.samples) == 10
    again = load_source("synthetic", kind=kind, n=10, size=(24, 32), seed=1)
    assert again.root == src.root
    assert load_source("synthetic", kind=kind, n=10, size=(24, 32), seed=2).root != src.root
    _, mask = render_sample(3, size=(24, 32), kind=kind, seed=1)
    np.testing.assert_array_equal(src.decode_mask(src.samples[3].mask), mask)  # type: ignore[arg-type]
