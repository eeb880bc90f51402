"""Decode image and mask files into the arrays every other module expects.

Images become ``uint8 H×W×3`` RGB whatever the file holds (RGBA, 16-bit, grey, palette, CMYK);
masks become ``uint8 H×W`` class indices with 255 = void, *checked* against the class table so a wrong
mask format is caught when the data is loaded, not as a silent accuracy drop after training.
Every failure is a :class:`~semiseg.errors.DataError` naming the file; no PIL traceback reaches a user.

EXIF orientation is deliberately *not* applied: masks carry no EXIF, so image and mask stay aligned
in their stored pixel order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from semiseg.data.classes import IGNORE_INDEX, ClassTable
from semiseg.errors import DataError

MASK_FORMATS = ("auto", "threshold", "index", "color")
DECODER_VERSION = 1  # part of every decoder's ``cache_key``: bump when decoding output changes
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, UnidentifiedImageError)


def _open(path: Path) -> Image.Image:
    """Open and fully decode ``path`` (``load()`` so truncated data fails here, not later)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        im = Image.open(path)
        im.load()
    except _PIL_ERRORS as e:
        hint = "truncated or corrupt file" if "trunc" in str(e).lower() or "broken" in str(e).lower() else e
        fmt = path.suffix.lstrip(".").upper() or "image"
        raise DataError(f"{path}: cannot decode image ({hint}; {fmt})") from e
    return im


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the file header only (no pixel decoding), for cheap size checks."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except _PIL_ERRORS as e:
        raise DataError(f"{path}: cannot read image header ({e})") from e
    return h, w


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth array to 8 bit by the range of its storage type.

    uint16 (and 32-bit ints within 0..65535, how PIL stores 16-bit data) are shifted right by 8;
    floats in [0, 1] are multiplied by 255; anything else is min-max scaled by the values present.
    """
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        return (a.astype(np.uint16) >> 8).astype(np.uint8)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if a.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        return (a.astype(np.uint32) >> 8).astype(np.uint8)
    if a.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return np.round(a * 255.0).astype(np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.round((a.astype(np.float64) - lo) * scale).astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
    """Decode ``path`` to a contiguous ``uint8 H×W×3`` RGB array (alpha dropped, grey replicated)."""
    im = _open(path)
    mode = im.mode
    try:
        if mode in ("RGB", "L"):
            a = np.asarray(im)
        elif mode == "1":
            a = np.asarray(im.convert("L"))
        elif mode.startswith("I") or mode == "F":
            a = _to_uint8(np.asarray(im))
        elif mode in ("RGBA", "RGBa", "RGBX"):
            a = np.asarray(im)[..., :3]
        elif mode in ("LA", "La", "PA"):
            a = np.asarray(im.convert("RGBA"))[..., :3]
        elif mode == "P":
            a = np.asarray(im.convert("RGBA"))[..., :3]
        else:  # CMYK, YCbCr, LAB, HSV ...
            a = np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unsupported image mode {mode!r} ({e})") from e
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a, dtype=np.uint8)


def read_mask_raw(path: Path) -> tuple[str, np.ndarray]:
    """The stored values of a mask file, without interpretation: ``(PIL mode, array)``.

    'P' keeps palette *indices*, '1' becomes 0/1, alpha is dropped, 16-bit stays uint16 (H×W or H×W×3).
    """
    im = _open(path)
    mode = im.mode
    if mode == "1":
        return mode, np.asarray(im, dtype=np.uint8)
    if mode in ("P", "L"):
        return mode, np.asarray(im)
    if mode.startswith("I;16"):
        return mode, np.asarray(im).astype(np.uint16)
    if mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"{path}: 32-bit mask values outside 0..65535")
        return mode, a.astype(np.uint16)
    if mode in ("RGB", "RGBA", "RGBX"):
        return mode, np.asarray(im)[..., :3]
    if mode == "LA":
        return mode, np.asarray(im)[..., 0]
    try:
        return mode, np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: unsupported mask mode {mode!r}") from e


def _grey(path: Path, a: np.ndarray) -> np.ndarray:
    """A 2-D view of a mask whose colour channels must all be equal (index masks saved as RGB)."""
    if a.ndim == 2:
        return a
    if np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]):
        return a[..., 0]
    raise DataError(f"{path}: colour-coded mask where class indices were expected "
                    "(use mask_format='color' with a class table that has colours)")


def _fmt_values(values: Iterable[int], limit: int = 10) -> str:
    vals = sorted(int(v) for v in values)
    text = ", ".join(str(v) for v in vals[:limit])
    return text + (f", ... ({len(vals)} values)" if len(vals) > limit else "")


def check_values(path: Path, mask: np.ndarray, classes: ClassTable) -> np.ndarray:
    """Raise a DataError naming ``path`` and the values of ``mask`` that are neither a class nor void."""
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts) if v >= classes.num_classes and v != classes.ignore_index]
    if bad:
        raise DataError(f"{path}: mask values {_fmt_values(bad)} outside the class table "
                        f"(0..{classes.num_classes - 1}, {classes.ignore_index} = void)")
    return mask


class ThresholdMask:
    """Binary masks with compression noise (JPEG): pixel -> 1 when the mean over its channels >= threshold.

    Works for 'RGB', 'L', '1' and 16-bit grey (compared after scaling to 8 bit). Needs a 2-class table.
    """

    def __init__(self, classes: ClassTable, threshold: int = 128) -> None:
        if not classes.is_binary:
            raise DataError(f"threshold masks need a binary class table, got {classes.num_classes} classes")
        self.classes, self.threshold = classes, threshold

    def __call__(self, path: Path) -> np.ndarray:
        mode, a = read_mask_raw(path)
        if mode == "1":
            return a
        if mode == "P":
            a = read_image(path)
        if a.dtype != np.uint8:
            a = _to_uint8(a)
        if a.ndim == 2:
            return (a >= self.threshold).view(np.uint8)
        # mean >= t  <=>  sum >= 3 t: integer sums, much faster than a float mean
        total = a[..., 0].astype(np.uint16) + a[..., 1] + a[..., 2]
        return (total >= 3 * self.threshold).view(np.uint8)

    @property
    def cache_key(self) -> str:
        """Stable identity for decoded-mask caches (same key <=> same output for the same file)."""
        return f"ThresholdMask/v{DECODER_VERSION}(threshold={self.threshold!r})"

    def __repr__(self) -> str:
        return f"ThresholdMask(threshold={self.threshold})"


class IndexMask:
    """Masks that store class indices: index/'L' PNG, palette PNG (indices kept), 1-bit PNG (0/1).

    A raw value in ``void_values`` becomes 255; with ``mapping`` (e.g. Cityscapes labelId -> trainId)
    every other raw value goes through it and unmapped values become 255. The result is checked
    against the class table.
    """

    def __init__(self, classes: ClassTable, void_values: Iterable[int] = (IGNORE_INDEX,),
                 mapping: Mapping[int, int] | None = None) -> None:
        self.classes = classes
        self.void_values = frozenset(int(v) for v in void_values)
        self.mapping = dict(mapping) if mapping is not None else None
        self._lut8 = self._lut(256)

    def _lut(self, size: int) -> np.ndarray:
        if self.mapping is None:
            lut = np.arange(size, dtype=np.int64)
        else:
            lut = np.full(size, IGNORE_INDEX, dtype=np.int64)
            for k, v in self.mapping.items():
                if 0 <= k < size:
                    lut[k] = v
        for v in self.void_values:
            if 0 <= v < size:
                lut[v] = IGNORE_INDEX
        return lut

    def __call__(self, path: Path) -> np.ndarray:
        mode, a = read_mask_raw(path)
        a = _grey(path, a)
        lut = self._lut8 if a.dtype == np.uint8 else self._lut(int(a.max()) + 1 if a.size else 1)
        out = lut[a]
        if out.size and out.max() > 255:  # only reachable for 16-bit masks without a mapping
            big = np.unique(out[out > 255])
            raise DataError(f"{path}: mask values {_fmt_values(big)} outside the class table "
                            f"(0..{self.classes.num_classes - 1}, {self.classes.ignore_index} = void)")
        return check_values(path, out.astype(np.uint8), self.classes)

    @property
    def cache_key(self) -> str:
        mapping = sorted(self.mapping.items()) if self.mapping is not None else None
        return (f"IndexMask/v{DECODER_VERSION}(classes={self.classes.num_classes}, "
                f"void={sorted(self.void_values)}, mapping={mapping})")

    def __repr__(self) -> str:
        extra = f", mapping={len(self.mapping)} values" if self.mapping is not None else ""
        return f"IndexMask(void_values={sorted(self.void_values)}{extra})"


def _code(rgb: tuple[int, int, int]) -> int:
    r, g, b = (int(c) for c in rgb)
    return (r << 16) | (g << 8) | b


class ColorMask:
    """RGB colour-coded masks: each colour of ``color_table`` (default: the table's colours) is a class.

    ``void_colors`` become 255; any other colour is an error naming the colour and its pixel count.
    """

    def __init__(self, classes: ClassTable, color_table: Mapping[tuple[int, int, int], int] | None = None,
                 void_colors: Iterable[tuple[int, int, int]] = ()) -> None:
        if color_table is None:
            if not classes.colors:
                raise DataError("colour-coded masks need a class table with colours")
            color_table = {tuple(c): i for i, c in enumerate(classes.colors)}
        self.classes = classes
        self.table = {_code(c): int(i) for c, i in color_table.items()}
        for c in void_colors:
            self.table[_code(c)] = IGNORE_INDEX

    def __call__(self, path: Path) -> np.ndarray:
        mode, a = read_mask_raw(path)
        if a.ndim == 2:
            a = read_image(path) if mode == "P" else np.repeat(_to_uint8(a)[..., None], 3, axis=2)
        a = a.astype(np.int32)
        codes = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]
        uniq, inv, counts = np.unique(codes.ravel(), return_inverse=True, return_counts=True)
        unknown = [(int(u), int(n)) for u, n in zip(uniq, counts, strict=True) if int(u) not in self.table]
        if unknown:
            unknown.sort(key=lambda t: -t[1])
            shown = "; ".join(f"({u >> 16}, {(u >> 8) & 255}, {u & 255}) in {n} pixels" for u, n in unknown[:5])
            more = f"; ... {len(unknown)} unknown colours" if len(unknown) > 5 else ""
            raise DataError(f"{path}: colours not in the class table: {shown}{more}")
        values = np.array([self.table[int(u)] for u in uniq], dtype=np.uint8)
        out = values[inv].reshape(codes.shape)
        return check_values(path, out, self.classes)

    @property
    def cache_key(self) -> str:
        return f"ColorMask/v{DECODER_VERSION}(classes={self.classes.num_classes}, table={sorted(self.table.items())})"

    def __repr__(self) -> str:
        return f"ColorMask({len(self.table)} colours)"


def _looks_binary(values: np.ndarray) -> bool:
    """Grey levels of a black/white mask: exactly two values, the low one 0 and the high one >= 128."""
    return len(values) == 2 and values[0] == 0 and values[1] >= 128


def choose_mask_format(path: Path) -> str:
    """The ``auto`` rule, decided from one mask file (document for users; see ``make_mask_decoder``).

    - lossy JPEG file -> ``threshold`` (compression noise means it can only hold black/white masks);
    - mode '1' (1-bit) or 'P' (palette; the indices are the classes) -> ``index``;
    - grey ('L', 16-bit, or RGB with equal channels): exactly two levels {0, v >= 128} -> ``threshold``
      (a black/white mask), otherwise -> ``index`` (the values are class ids, 255 = void);
    - RGB with differing channels -> ``color`` (needs a class table with colours).
    """
    with_suffix = Path(path).suffix.lower()
    mode, a = read_mask_raw(path)
    if with_suffix in (".jpg", ".jpeg"):
        return "threshold"
    if mode in ("1", "P"):
        return "index"
    if a.ndim == 3 and not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
        return "color"
    grey = a if a.ndim == 2 else a[..., 0]
    return "threshold" if _looks_binary(np.unique(grey)) else "index"


def make_mask_decoder(fmt: str, classes: ClassTable) -> ThresholdMask | IndexMask | ColorMask:
    """Build the decoder named ``fmt`` (``threshold`` / ``index`` / ``color``) for ``classes``."""
    if fmt == "threshold":
        return ThresholdMask(classes)
    if fmt == "index":
        return IndexMask(classes)
    if fmt == "color":
        return ColorMask(classes)
    raise DataError(f"unknown mask format {fmt!r} (choose one of {', '.join(MASK_FORMATS)})")
