"""Generic folder sources and split-file helpers.

A *folder source* is ``root/images/`` + ``root/masks/`` paired by file stem, plus an optional folder
of unlabeled images that have no masks at all. Everything is sorted by stem (Python string order) so
the sample order never depends on the file system. Mistakes a user can make with such a folder (a
missing mask, a stray mask, ``a.jpg`` next to ``a.png``, an empty folder) are DataErrors naming the
folder and the files, raised when the source is built rather than in the middle of training.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from semiseg.data.classes import IGNORE_INDEX, ClassTable
from semiseg.data.decode import IndexMask, choose_mask_format, make_mask_decoder
from semiseg.data.types import DataSource, MaskDecoder, Sample
from semiseg.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
_INFER_SAMPLE = 32  # masks looked at to infer a class table (see ``infer_classes``)


def _show(items: list[str], limit: int = 5) -> str:
    text = ", ".join(repr(s) for s in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def list_images(folder: Path, *, what: str = "images") -> dict[str, Path]:
    """Image files directly in ``folder`` by stem (hidden files and other extensions are skipped).

    Raises a DataError for a missing or empty folder and for two files sharing a stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    by_stem: dict[str, Path] = {}
    clashes: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        if p.stem in by_stem:
            clashes.append(f"{by_stem[p.stem].name} / {p.name}")
            continue
        by_stem[p.stem] = p
    if clashes:
        raise DataError(f"{folder}: several files with the same stem ({'; '.join(clashes[:5])}); "
                        "keep one file per stem")
    if not by_stem:
        exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise DataError(f"{folder}: no {what} ({exts}) in this folder")
    return dict(sorted(by_stem.items()))


def read_stem_list(path: Path, known: Iterable[str] | None = None) -> list[str]:
    """Stems listed in a split file (one per line; blank lines and ``#`` comments skipped).

    With ``known``, every stem must be one of them: a split naming files that do not exist is a
    mistake (wrong dataset, file extension left in) that must not silently shrink a split.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataError(f"{path}: split file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read split file ({e})") from e
    stems = [s.strip() for s in text.splitlines()]
    stems = [s for s in stems if s and not s.startswith("#")]
    dups = sorted({s for s in stems if stems.count(s) > 1}) if len(set(stems)) != len(stems) else []
    if dups:
        raise DataError(f"{path}: stems listed twice: {_show(dups)}")
    if known is not None:
        _check_known(path, stems, known)
    return stems


def _check_known(path: Path, stems: list[str], known: Iterable[str]) -> None:
    known_set = set(known)
    unknown = [s for s in stems if s not in known_set]
    if unknown:
        hint = ""
        if any(Path(s).stem in known_set for s in unknown):
            hint = " (list stems without the file extension)"
        raise DataError(f"{path}: {len(unknown)} stems not in the data: {_show(unknown)}{hint}")


def write_stem_list(path: Path, stems: Iterable[str], known: Iterable[str] | None = None) -> Path:
    """Write ``stems`` one per line, atomically; rejects stems that could not be read back as written."""
    path = Path(path)
    stems = list(stems)
    for s in stems:
        if not s or s != s.strip() or "\n" in s or "\r" in s or s.startswith("#"):
            raise DataError(f"{path}: stem {s!r} cannot be stored in a split file")
    if len(set(stems)) != len(stems):
        raise DataError(f"{path}: stems listed twice: {_show(sorted({s for s in stems if stems.count(s) > 1}))}")
    if known is not None:
        _check_known(path, stems, known)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(f"{s}\n" for s in stems))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def infer_classes(fmt: str, decoder_masks: list[Path]) -> ClassTable:
    """Class table for a folder given without one.

    ``threshold`` masks -> binary ``background/object``. ``index`` masks: the values found in up to
    32 masks spread evenly over the set (255 = void); values within {0, 1} -> binary
    ``background/object``, otherwise classes ``class_0 .. class_<max>``. A later mask with a larger
    value is reported by the decoder (and by ``semiseg data inspect``); pass ``classes`` to be exact.
    """
    if fmt == "threshold":
        return ClassTable.binary("object")
    if fmt != "index":
        raise DataError(f"{decoder_masks[0].parent}: {fmt} masks need an explicit class table "
                        "(pass classes=... with names and colours)")
    n = len(decoder_masks)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, min(n, _INFER_SAMPLE))})
    probe = IndexMask(ClassTable(tuple(f"class_{i}" for i in range(255))))
    found: set[int] = set()
    for i in picks:
        m = probe(decoder_masks[i])
        found |= {int(v) for v in np.flatnonzero(np.bincount(m.ravel(), minlength=256))}
    found.discard(IGNORE_INDEX)
    top = max(found, default=0)
    if top <= 1:
        return ClassTable.binary("object")
    return ClassTable(tuple(f"class_{i}" for i in range(top + 1)))


def _resolve(root: Path, sub: str | Path) -> Path:
    sub = Path(sub)
    return sub if sub.is_absolute() else root / sub


def folder_source(root: str | Path, *, images: str | Path = "images", masks: str | Path = "masks",
                  unlabeled: str | Path | None = None, classes: ClassTable | None = None,
                  mask_format: str | MaskDecoder = "auto", name: str | None = None,
                  splits: Mapping[str, str | Path] | None = None,
                  group_of: Callable[[str], str | None] | None = None,
                  subset: str | None = None) -> DataSource:
    """A source from ``root/images`` + ``root/masks`` paired by stem, and optional unlabeled images.

    ``mask_format`` is ``auto`` (decided from the first mask, see ``choose_mask_format``),
    ``threshold``, ``index``, ``color`` or a ready decoder. ``splits`` maps a split name to a stem-list
    file (relative to ``root``) that becomes ``fixed_splits``; ``group_of(stem)`` sets sample groups.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    img_dir, mask_dir = _resolve(root, images), _resolve(root, masks)
    imgs = list_images(img_dir, what="images")
    msks = list_images(mask_dir, what="masks")
    no_mask = [s for s in imgs if s not in msks]
    if no_mask:
        raise DataError(f"{mask_dir}: no mask for {len(no_mask)} images of {img_dir}: {_show(no_mask)} "
                        "(images without masks belong in a separate unlabeled folder)")
    no_img = [s for s in msks if s not in imgs]
    if no_img:
        raise DataError(f"{img_dir}: no image for {len(no_img)} masks of {mask_dir}: {_show(no_img)}")

    mask_paths = list(msks.values())
    if callable(mask_format):
        if classes is None:
            raise DataError(f"{root}: a custom mask decoder needs an explicit class table")
        decoder: MaskDecoder = mask_format
    else:
        fmt = choose_mask_format(mask_paths[0]) if mask_format == "auto" else mask_format
        if classes is None:
            classes = infer_classes(fmt, mask_paths)
        decoder = make_mask_decoder(fmt, classes)

    def group(stem: str) -> str | None:
        return group_of(stem) if group_of is not None else None

    samples = [Sample(s, imgs[s], msks[s], group(s), subset) for s in imgs]
    unl: list[Sample] = []
    if unlabeled is not None:
        unl_dir = _resolve(root, unlabeled)
        found = list_images(unl_dir, what="unlabeled images")
        both = [s for s in found if s in imgs]
        if both:
            raise DataError(f"{unl_dir}: stems also in {img_dir}: {_show(both)}; a stem must be unique")
        unl = [Sample(s, p, None, group(s), subset) for s, p in found.items()]
    known = [s.stem for s in [*samples, *unl]]
    fixed = {k: read_stem_list(_resolve(root, v), known) for k, v in (splits or {}).items()}
    return DataSource(name=name or root.resolve().name, root=root, classes=classes, samples=samples,
                      decode_mask=decoder, unlabeled=unl, fixed_splits=fixed)
