"""Pictures for reports: thumbnails, overlays and matplotlib charts, all returned as ``data:`` URIs.

Charts use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no
display needed). Thumbnails are downscaled to at most ``max_px`` on their longer side BEFORE any
colouring, so a report's size depends on the thumbnail budget, not on the images' resolution.
Photographic thumbnails are JPEG (small), charts PNG (sharp lines).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from semiseg.data.classes import IGNORE_INDEX, ClassTable

IGNORE_COLOR = (128, 128, 128)
#: binary class tables colour the object white, invisible on bright images: shown in this colour instead
#: (cyan: stands out on the red / pink tissue of endoscopy and on most natural images)
BINARY_OBJECT_COLOR = (0, 230, 255)
TP_COLOR, FP_COLOR, FN_COLOR = (40, 200, 60), (255, 40, 40), (40, 120, 255)


# --------------------------------------------------------------------------------------- encoding
def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def encode_image(array: np.ndarray, fmt: str = "JPEG", quality: int = 82) -> str:
    """An ``H×W×3`` uint8 array (or ``H×W``) as a JPEG / PNG data URI."""
    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if fmt.upper() == "JPEG":
        im.save(buf, format="JPEG", quality=quality, optimize=True)
        return data_uri(buf.getvalue(), "image/jpeg")
    im.save(buf, format="PNG", optimize=True)
    return data_uri(buf.getvalue(), "image/png")


def decode_data_uri(uri: str) -> Image.Image:
    """The image of a ``data:image/...;base64,`` URI (for checks)."""
    head, _, payload = uri.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ValueError(f"not a base64 image data URI: {head[:40]!r}")
    im = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    im.load()
    return im


# ------------------------------------------------------------------------------------- thumbnails
def thumb_size(shape: Sequence[int], max_px: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side at most ``max_px`` (never upscaled), aspect kept."""
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, max_px / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize(array: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize an image (area-like, for uint8 RGB), a label map (``nearest``) or a float map to ``(h, w)``."""
    h, w = size
    if array.shape[:2] == (h, w):
        return array
    if nearest:
        return np.asarray(Image.fromarray(array).resize((w, h), Image.NEAREST))
    if array.dtype != np.uint8:
        return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
    method = Image.BOX if h < array.shape[0] else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((w, h), method))


def display_palette(classes: ClassTable) -> np.ndarray:
    """``256×3`` uint8 lookup: class colours (binary object in a visible colour), grey for ignore."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    colors = classes.palette()
    for i, c in enumerate(colors):
        lut[i] = c
    if classes.is_binary and tuple(colors[1]) == (255, 255, 255):
        lut[1] = BINARY_OBJECT_COLOR
    lut[IGNORE_INDEX] = IGNORE_COLOR
    return lut


def overlay(image: np.ndarray, label: np.ndarray, classes: ClassTable, alpha: float = 0.5) -> np.ndarray:
    """Class colours blended over the image. Classes coloured black (the background of binary and
    synthetic tables) and a binary task's background are left untouched rather than darkened."""
    lut = display_palette(classes)
    colors = lut[label]
    out = image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha
    keep = (colors == 0).all(-1)
    if classes.is_binary:
        keep |= label == 0
    out[keep] = image[keep]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def error_map(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, classes: ClassTable) -> np.ndarray:
    """Where the prediction is wrong. Binary: green TP, red FP, blue FN. Multi-class: red = wrong class.

    Ignored ground-truth pixels and unpredicted pixels (255 in ``pred``) are grey; the image is dimmed
    so the colours stand out.
    """
    out = (image.astype(np.float32) * 0.45).astype(np.uint8)
    valid = (gt != IGNORE_INDEX) & (pred != IGNORE_INDEX)
    if classes.is_binary or classes.foreground is not None:
        fg = classes.foreground if classes.foreground is not None else 1
        p, g = pred == fg, gt == fg
        out[valid & p & g] = TP_COLOR
        out[valid & p & ~g] = FP_COLOR
        out[valid & ~p & g] = FN_COLOR
    else:
        out[valid & (pred != gt)] = FP_COLOR
    out[~valid] = IGNORE_COLOR
    return out


def confidence_map(image: np.ndarray, confidence: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """Confidence (max softmax) as a colour map over a faint grey image: dark = ``1 / num_classes`` (the
    least a max softmax can be, a coin toss), yellow = 1. Pixels with confidence 0 (not predicted) are dark."""
    from matplotlib import colormaps

    floor = 1.0 / max(2, num_classes)
    scaled = np.clip((np.asarray(confidence, np.float32) - floor) / (1.0 - floor), 0.0, 1.0)
    rgb = colormaps["viridis"](scaled)[..., :3] * 255.0
    grey = image.astype(np.float32).mean(-1, keepdims=True)
    return np.clip(0.8 * rgb + 0.2 * grey + 0.5, 0, 255).astype(np.uint8)


def legend(classes: ClassTable) -> list[tuple[str, str]]:
    """``(name, "#rrggbb")`` per class as drawn in overlays."""
    lut = display_palette(classes)
    return [(n, "#" + "".join(f"{int(v):02x}" for v in lut[i])) for i, n in enumerate(classes.names)]


# ------------------------------------------------------------------------------------------ charts
def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80, layout="constrained")
    return fig


def figure_uri(fig: Any, dpi: int = 80) -> str:
    """Render a matplotlib Figure to a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return data_uri(buf.getvalue(), "image/png")


def curves_figure(records: Sequence[Mapping[str, Any]], title: str, val_metric: str | None = None) -> str:
    """Training curves of one stage: ``train/*`` losses (left) and ``val/*`` metrics (right) against step."""
    fig = _figure(9.0, 2.8)
    ax_l, ax_r = fig.subplots(1, 2)
    shown_val = {f"val/{val_metric}", "val/miou"} if val_metric else None
    keys = sorted({k for r in records for k in r if k.startswith("train/")
                   or (k.startswith("val/") and (shown_val is None or k in shown_val))})
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax = ax_l if key.startswith("train/") else ax_r
        bold = key == f"val/{val_metric}"
        ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, ms=3, lw=2.2 if bold else 1.2, label=key)
    for ax, name in ((ax_l, "training (train/*)"), (ax_r, "validation")):
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="#888")
    fig.suptitle(title, fontsize=11)
    return figure_uri(fig)


def round_figure(stats: Mapping[str, Any], classes: ClassTable) -> str:
    """One pseudo-label round: confidence histogram (left) and per-class share of selected pixels (right)."""
    fig = _figure(9.0, 2.6)
    ax_h, ax_c = fig.subplots(1, 2)
    hist = stats.get("confidence_histogram") or {}
    counts = np.asarray(hist.get("counts") or [], dtype=np.float64)
    edges = np.asarray(hist.get("bin_edges") or [], dtype=np.float64)
    if counts.size and edges.size == counts.size + 1 and counts.sum() > 0:
        ax_h.bar(edges[:-1], counts / counts.sum(), width=np.diff(edges), align="edge", color="#4c72b0",
                 edgecolor="white", lw=0.5)
    ax_h.set_xlabel("confidence")
    ax_h.set_ylabel("share of pixels")
    ax_h.set_title("confidence histogram (all pixels)", fontsize=10)
    shares = [0.0 if s is None else float(s) for s in (stats.get("class_share") or [])]
    names = list(classes.names[:len(shares)]) + [str(i) for i in range(len(classes.names), len(shares))]
    lut = display_palette(classes)
    colors = [tuple(lut[i] / 255.0) if i < 255 else (0.5, 0.5, 0.5) for i in range(len(shares))]
    if shares:
        ax_c.barh(range(len(shares)), shares, color=colors, edgecolor="#333", lw=0.5)
        ax_c.set_yticks(range(len(shares)), names, fontsize=8)
        ax_c.invert_yaxis()
    ax_c.set_xlabel("share of selected pixels")
    ax_c.set_title("per-class share", fontsize=10)
    for ax in (ax_h, ax_c):
        ax.grid(alpha=0.3)
    return figure_uri(fig)


def bar_figure(labels: Sequence[str], means: Sequence[float | None], stds: Sequence[float | None],
               title: str) -> str:
    """Horizontal bars with ± std whiskers (comparison pages)."""
    fig = _figure(7.0, 0.5 + 0.32 * max(1, len(labels)))
    ax = fig.subplots()
    err = [0.0 if s is None else s for s in stds]
    vals = [float("nan") if m is None else m for m in means]
    ax.barh(range(len(labels)), vals, xerr=err, color="#4c72b0", ecolor="#333", capsize=3)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return figure_uri(fig)
