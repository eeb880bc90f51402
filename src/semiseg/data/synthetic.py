"""A deterministic synthetic segmentation dataset, hard enough that labels matter.

Used by tests, examples and benchmarks that must run without real data. The images are designed
so that a small network trained on 10% of them is clearly worse than one trained on all of them
(otherwise semi-supervised methods have nothing to gain):

- ``binary`` (background / polyp): tissue-coloured background with low-frequency shading, texture,
  vessel-like streaks and *folds* (elongated bright ridges that look like polyps in colour but not in
  shape), 0-3 polyps per image (some images have none) with harmonic-perturbed contours, a wide
  range of sizes, a colour that is sometimes very close to the background, dome shading, specular
  highlights on polyps *and* on background, vignetting, blur and noise.
- ``multiclass`` (background + blob / spotted / bar / star): object colours are drawn from the same
  distribution for every class, so classes differ by shape and texture only.

``difficulty="moderate"`` keeps the shapes, sizes, shading and noise but drops what makes ``hard`` slow to
learn from scratch: no folds, polyps always clearly lighter than their tissue (no camouflaged objects in
``multiclass``). A from-scratch Unet trained on ``hard`` for a few hundred CPU steps stays at the class
prior once it sees more than a few dozen labeled images, so the demo uses ``moderate``.

Each image depends only on ``(seed, index, size, kind, difficulty)``; the mask is exact (drawn from the same
geometry, never thresholded from the rendered image).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from semiseg.atomic import publish_directory
from semiseg.data.classes import ClassTable
from semiseg.errors import DataError

GENERATOR_VERSION = 1
KINDS = ("binary", "multiclass")
DIFFICULTIES = ("hard", "moderate")
MULTICLASS_NAMES = ("background", "blob", "spotted", "bar", "star")
_MARKER = "synthetic.json"


def synthetic_classes(kind: str) -> ClassTable:
    """The class table of a synthetic ``kind``."""
    if kind == "binary":
        return ClassTable.binary("polyp")
    if kind == "multiclass":
        colors = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200))
        return ClassTable(MULTICLASS_NAMES, colors)
    raise DataError(f"synthetic kind {kind!r} unknown (choose {' or '.join(KINDS)})")


def synthetic_params(n: int, size: tuple[int, int], kind: str, seed: int,
                     difficulty: str = "hard") -> dict[str, object]:
    """The parameters that define a synthetic set (and its cache key)."""
    h, w = (int(v) for v in size)
    if n < 1 or h < 16 or w < 16:
        raise DataError(f"synthetic data needs n >= 1 and size >= 16x16 (got n={n}, size={size})")
    synthetic_classes(kind)
    if difficulty not in DIFFICULTIES:
        raise DataError(f"synthetic difficulty {difficulty!r} unknown (choose {' or '.join(DIFFICULTIES)})")
    params: dict[str, object] = {"version": GENERATOR_VERSION, "kind": kind, "n": int(n), "size": [h, w],
                                 "seed": int(seed)}
    if difficulty != "hard":  # sets generated before the option existed keep their key
        params["difficulty"] = difficulty
    return params


def params_hash(params: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- drawing helpers
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with features about ``h / cells`` pixels wide."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return img
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)))


def _polar(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float,
           aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Radius and angle of every pixel in an object frame (rotated, x stretched by ``aspect``)."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / aspect, -s * dx + c * dy
    return np.sqrt(u * u + v * v), np.arctan2(v, u)


def _harmonic_radius(rng: np.random.Generator, theta: np.ndarray, r0: float, amp: float,
                     orders: tuple[int, int]) -> np.ndarray:
    r = np.ones_like(theta)
    for k in range(orders[0], orders[1] + 1):
        r += rng.uniform(0, amp) / k ** 0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r0 * np.clip(r, 0.35, None)


def _streaks(rng: np.random.Generator, h: int, w: int, count: int, width: tuple[int, int],
             wander: float) -> np.ndarray:
    """Smooth random curves (vessels, folds) as a float layer in [0, 1]."""
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(count):
        x, y = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
        heading, pts = rng.uniform(0, 2 * np.pi), []
        for _ in range(int(rng.integers(6, 14))):
            pts.append((x, y))
            heading += rng.normal(0, wander)
            step = rng.uniform(0.04, 0.1) * max(h, w)
            x, y = x + step * np.cos(heading), y + step * np.sin(heading)
        draw.line(pts, fill=int(rng.integers(120, 256)), width=int(rng.integers(*width)), joint="curve")
    return np.asarray(layer, dtype=np.float32) / 255.0


def _speculars(rng: np.random.Generator, h: int, w: int, where: np.ndarray | None, count: int) -> np.ndarray:
    """Small white spots, placed inside ``where`` when given (else anywhere)."""
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    ys, xs = np.nonzero(where) if where is not None else (None, None)
    for _ in range(count):
        if ys is not None:
            if len(ys) == 0:
                break
            j = int(rng.integers(len(ys)))
            cy, cx = float(ys[j]), float(xs[j])
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.5, 0.025 * min(h, w) + 1)
        draw.ellipse((cx - r * rng.uniform(1, 2), cy - r, cx + r * rng.uniform(1, 2), cy + r), fill=255)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32) / 255.0


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Vignetting, blur and sensor noise common to both kinds; returns uint8."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
    rr = ((yy - cy) / h) ** 2 + ((xx - cx) / w) ** 2
    img = img * (1.0 - rng.uniform(0.5, 1.6) * rr)[..., None]
    img = img + rng.normal(0, rng.uniform(2, 7), img.shape).astype(np.float32)
    out = np.clip(img, 0, 255).astype(np.uint8)
    return _blur(out, float(rng.uniform(0, 1.3)))


# ----------------------------------------------------------------------------- binary
def _tissue(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    base = np.array([rng.uniform(150, 225), rng.uniform(60, 125), rng.uniform(45, 105)], np.float32)
    shade = 1 + 0.16 * _smooth_noise(rng, h, w, 3) + 0.08 * _smooth_noise(rng, h, w, 12)
    img = base * shade[..., None]
    img = img + 6 * _smooth_noise(rng, h, w, max(4, w // 4))[..., None] * np.array([1, 0.6, 0.5], np.float32)
    vessels = _streaks(rng, h, w, int(rng.integers(1, 6)), (1, 3), 0.45)
    img = img * (1 - 0.35 * vessels[..., None] * np.array([0.3, 1.0, 0.9], np.float32))
    return img, base


def _binary_sample(rng: np.random.Generator, h: int, w: int, hard: bool) -> tuple[np.ndarray, np.ndarray]:
    img, base = _tissue(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    folds = _streaks(rng, h, w, int(rng.integers(0, 4)) if hard else 0, (max(2, h // 24), max(4, h // 9)), 0.25)
    fold_tint = 1 + rng.uniform(0.05, 0.25) * np.array([0.6, 1.0, 1.0], np.float32)
    img = img * (1 + (fold_tint - 1) * _blur((folds * 255).astype(np.uint8), 2.0)[..., None] / 255.0)
    mask = np.zeros((h, w), np.uint8)
    n_polyps = int(rng.choice(4, p=[0.15, 0.5, 0.25, 0.1]))
    for _ in range(n_polyps):
        r0 = min(h, w) * float(np.exp(rng.uniform(np.log(0.05), np.log(0.3))))
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        rho, theta = _polar(yy, xx, cy, cx, rng.uniform(0, np.pi), rng.uniform(0.65, 1.5))
        rad = _harmonic_radius(rng, theta, r0, 0.35, (2, 5))
        inside = rho <= rad
        if not inside.any():
            continue
        if hard:
            contrast = rng.uniform(0.08, 0.35) if rng.random() < 0.8 else rng.uniform(0.02, 0.08)
            contrast *= rng.choice([-1, 1])
        else:
            contrast = rng.uniform(0.25, 0.45)
        colour = base * (1 + contrast * rng.uniform(0.3, 1.0, 3).astype(np.float32))
        dome = np.clip(1 - (rho / np.maximum(rad, 1e-3)) ** 2, 0, 1)
        body = colour * (1 + rng.uniform(0.05, 0.3) * dome + 0.05 * _smooth_noise(rng, h, w, 16))[..., None]
        alpha = _blur((inside * 255).astype(np.uint8), float(rng.uniform(0.3, 1.5))).astype(np.float32) / 255
        img = img * (1 - alpha[..., None]) + body * alpha[..., None]
        img = img * (1 - rng.uniform(0.1, 0.3) * (alpha * (1 - alpha) * 4)[..., None])  # dark rim
        mask[inside] = 1
        spec = _speculars(rng, h, w, inside & (dome > 0.3), int(rng.integers(0, 4)))
        img = img + (255 - img) * spec[..., None]
    spec = _speculars(rng, h, w, None, int(rng.integers(0, 6)))
    img = img + (255 - img) * spec[..., None]
    return _finish(rng, img), mask


# ----------------------------------------------------------------------------- multiclass
def _object_shape(rng: np.random.Generator, cls: int, yy: np.ndarray, xx: np.ndarray, h: int,
                  w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inside mask, u coordinate along the object, v across) for class ``cls``."""
    r0 = min(h, w) * rng.uniform(0.08, 0.22)
    cy, cx, ang = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w, rng.uniform(0, np.pi)
    c, s = np.cos(ang), np.sin(ang)
    u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
    if cls == 3:  # bar: rotated rectangle
        length, width = r0 * rng.uniform(1.2, 2.2), r0 * rng.uniform(0.3, 0.6)
        return (np.abs(u) <= length) & (np.abs(v) <= width), u, v
    rho, theta = np.sqrt(u * u / 1.0 + v * v), np.arctan2(v, u)
    if cls == 4:  # star: deep regular spikes
        k, depth = int(rng.integers(4, 8)), rng.uniform(0.35, 0.55)
        rad = r0 * 1.2 * (1 - depth + depth * np.abs(np.cos(k * theta / 2)) ** 2)
        return rho <= rad, u, v
    aspect = rng.uniform(0.7, 1.4)
    rho = np.sqrt((u / aspect) ** 2 + v * v)
    return rho <= _harmonic_radius(rng, theta, r0, 0.25, (2, 4)), u, v


def _multiclass_sample(rng: np.random.Generator, h: int, w: int, hard: bool) -> tuple[np.ndarray, np.ndarray]:
    base = rng.uniform(60, 200, 3).astype(np.float32)
    img = base * (1 + 0.25 * _smooth_noise(rng, h, w, 3))[..., None]
    img = img + 25 * np.stack([_smooth_noise(rng, h, w, 10) for _ in range(3)], axis=2)
    clutter = _streaks(rng, h, w, int(rng.integers(2, 7)), (1, max(2, h // 20)), 0.6)
    img = img * (1 - 0.4 * clutter[..., None])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 6))):
        cls = int(rng.integers(1, 5))
        inside, u, v = _object_shape(rng, cls, yy, xx, h, w)
        if not inside.any():
            continue
        colour = rng.uniform(40, 230, 3).astype(np.float32)
        if hard and rng.random() < 0.3:  # camouflaged: close to the local background colour
            colour = base * rng.uniform(0.8, 1.2, 3).astype(np.float32)
        tex = np.ones((h, w), np.float32)
        period = min(h, w) * rng.uniform(0.04, 0.07)
        if cls == 2:  # spotted
            tex = 1 - 0.45 * ((np.sin(u / period * np.pi) * np.sin(v / period * np.pi)) > 0.55)
        elif cls == 3:  # stripes across the bar
            tex = 1 - 0.4 * (np.sin(u / period * np.pi) > 0)
        elif cls in (1, 4):
            tex = 1 + 0.06 * _smooth_noise(rng, h, w, 8)
        body = colour * tex[..., None]
        alpha = _blur((inside * 255).astype(np.uint8), float(rng.uniform(0.3, 1.0))).astype(np.float32) / 255
        img = img * (1 - alpha[..., None]) + body * alpha[..., None]
        mask[inside] = cls
    return _finish(rng, img), mask


def render_sample(index: int, *, size: tuple[int, int] = (128, 128), kind: str = "binary",
                  seed: int = 0, difficulty: str = "hard") -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8 H×W×3) and exact mask (uint8 H×W) number ``index`` of a synthetic set."""
    synthetic_params(1, size, kind, seed, difficulty)
    rng = np.random.default_rng([int(seed), int(index), 0 if kind == "binary" else 1])
    h, w = size
    sample = _binary_sample if kind == "binary" else _multiclass_sample
    return sample(rng, h, w, difficulty == "hard")


def _matches(out_dir: Path, params: dict[str, object]) -> bool:
    try:
        return json.loads((out_dir / _MARKER).read_text())["params"] == params
    except (OSError, ValueError, KeyError):
        return False


def generate_synthetic(out_dir: str | Path, *, n: int = 300, size: tuple[int, int] = (128, 128),
                       kind: str = "binary", seed: int = 0, difficulty: str = "hard") -> Path:
    """Write ``n`` pairs as ``images/NNNN.png`` + ``masks/NNNN.png`` (index PNG) into ``out_dir``.

    Built in a temporary folder next to ``out_dir`` and published whole (``atomic.publish_directory``), so a
    crash never leaves a half-written set; a second call with the same parameters reuses it.
    ``size`` is ``(H, W)``.
    """
    out_dir = Path(out_dir)
    params = synthetic_params(n, size, kind, seed, difficulty)
    if out_dir.exists():
        if _matches(out_dir, params):
            return out_dir
        raise DataError(f"{out_dir}: exists and is not a synthetic set with parameters {params}")
    try:
        with publish_directory(out_dir, replace=False, mode=0o755) as tmp:
            _write_set(tmp, params, n=n, kind=kind, seed=seed, difficulty=difficulty)
    except OSError:
        if not _matches(out_dir, params):  # someone else finished first with other contents
            raise
    return out_dir


def _write_set(folder: Path, params: dict[str, object], *, n: int, kind: str, seed: int, difficulty: str) -> None:
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    width = max(4, len(str(n - 1)))
    h, w = params["size"]  # type: ignore[misc]
    for i in range(n):
        img, mask = render_sample(i, size=(h, w), kind=kind, seed=seed, difficulty=difficulty)
        Image.fromarray(img).save(folder / "images" / f"{i:0{width}d}.png", compress_level=1)
        Image.fromarray(mask).save(folder / "masks" / f"{i:0{width}d}.png", compress_level=1)
    marker = {"params": params, "classes": list(synthetic_classes(kind).names)}
    with open(folder / _MARKER, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
