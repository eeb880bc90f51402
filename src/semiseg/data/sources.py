"""Generic folder sources and split-file helpers.

A *folder source* is ``root/images/`` + ``root/masks/`` paired by file stem, plus an optional folder
of unlabeled images that have no masks at all. Everything is sorted by stem (Python string order) so
the sample order never depends on the file system. Mistakes a user can make with such a folder (a
missing mask, a stray mask, ``a.jpg`` next to ``a.png``, an empty folder) are DataErrors naming the
folder and the files, raised when the source is built rather than in the middle of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from semiseg.atomic import atomic_write_text
from semiseg.data.classes import ClassTable
from semiseg.data.decode import MASK_FORMATS, choose_mask_format, make_mask_decoder
from semiseg.data.mask_values import mask_values, mixed_binary_encodings, table_from_values
from semiseg.data.types import DataSource, MaskDecoder, Sample
from semiseg.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})


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
    atomic_write_text(path, "".join(f"{s}\n" for s in stems))  # utf-8, "\n" on every platform
    return path


def _check_storable_stems(paths: list[Path]) -> None:
    """A file whose stem a split file could not hold as written (leading or trailing spaces, a leading '#') is
    named before a run is made of it, not when its split lists are written."""
    odd = [p for p in paths if p.stem != p.stem.strip() or p.stem.startswith("#")]
    if odd:
        raise DataError(f"{odd[0]}: a file name that starts or ends with a space (or starts with '#') cannot be "
                        f"listed in a split file; rename it (such stems: {_show(sorted({p.stem for p in odd}))})")


def infer_classes(fmt: str, decoder_masks: list[Path], values: list[frozenset[int]] | None = None) -> ClassTable:
    """Class table for a folder given without one.

    ``threshold`` masks -> binary ``background/object``. ``index`` masks: the values found in *every*
    mask (read once, remembered by content in the decoded cache; 255 = void): values within {0, 1} ->
    binary ``background/object``, ``0..K`` -> classes ``class_0 .. class_K``; values with a gap (0, 1, 7)
    are a DataError naming the files with the stray values. Pass ``classes`` to be explicit. ``values``: the
    masks' values when already read.
    """
    if fmt == "threshold":
        return ClassTable.binary("object")
    if fmt != "index":
        raise DataError(f"{decoder_masks[0].parent}: {fmt} masks need an explicit class table "
                        "(pass classes=... with names and colours)")
    table = table_from_values(decoder_masks[0].parent, decoder_masks, values or mask_values(decoder_masks))
    if isinstance(table, str):
        raise DataError(table)
    return table


def class_table(names: ClassTable | Sequence[str]) -> ClassTable:
    """A class table from a list of names (``data.options.classes`` in a config); two names are binary."""
    if isinstance(names, ClassTable):
        return names
    if isinstance(names, str) or not all(isinstance(n, str) for n in names) or len(names) < 2:
        raise DataError(f"classes: expected a list of at least two class names, got {names!r}")
    if len(names) == 2:
        return ClassTable(tuple(names), ((0, 0, 0), (255, 255, 255)), foreground=1)
    return ClassTable(tuple(names))


def _resolve(root: Path, sub: str | Path) -> Path:
    sub = Path(sub)
    return sub if sub.is_absolute() else root / sub


def folder_source(root: str | Path, *, images: str | Path = "images", masks: str | Path = "masks",
                  unlabeled: str | Path | None = None, classes: ClassTable | Sequence[str] | None = None,
                  mask_format: str | MaskDecoder = "auto", name: str | None = None,
                  splits: Mapping[str, str | Path] | None = None,
                  group_of: Callable[[str], str | None] | None = None,
                  subset: str | None = None) -> DataSource:
    """A source from ``root/images`` + ``root/masks`` paired by stem, and optional unlabeled images.

    ``unlabeled`` defaults to ``root/unlabeled`` when that folder exists (the documented layout).
    ``classes`` is a ClassTable or a list of names (from a config). ``mask_format`` is ``auto`` (decided
    from the first mask, see ``choose_mask_format``),
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

    _check_storable_stems([*imgs.values(), *msks.values()])
    if isinstance(mask_format, str) and mask_format not in MASK_FORMATS:
        raise DataError(f"data.options.mask_format={mask_format!r}: choose one of {', '.join(MASK_FORMATS)}")
    mask_paths = list(msks.values())
    classes = class_table(classes) if classes is not None else None
    if callable(mask_format):
        if classes is None:
            raise DataError(f"{root}: a custom mask decoder needs an explicit class table")
        decoder: MaskDecoder = mask_format
    else:
        fmt = choose_mask_format(mask_paths[0]) if mask_format == "auto" else mask_format
        values = None
        if mask_format == "auto" and fmt in ("index", "threshold") and (classes is None or classes.is_binary) \
                and mask_paths[0].suffix.lower() not in (".jpg", ".jpeg"):  # JPEG: compression noise, no values
            values = mask_values(mask_paths)
            mixed = mixed_binary_encodings(mask_dir, fmt, mask_paths, values)
            if mixed:
                raise DataError(mixed)
        if classes is None:
            classes = infer_classes(fmt, mask_paths, values)
        decoder = make_mask_decoder(fmt, classes)

    def group(stem: str) -> str | None:
        return group_of(stem) if group_of is not None else None

    samples = [Sample(s, imgs[s], msks[s], group(s), subset) for s in imgs]
    unl: list[Sample] = []
    if unlabeled is None and (root / "unlabeled").is_dir():
        unlabeled = "unlabeled"
    if unlabeled is not None:
        unl_dir = _resolve(root, unlabeled)
        found = list_images(unl_dir, what="unlabeled images")
        both = [s for s in found if s in imgs]
        if both:
            raise DataError(f"{unl_dir}: stems also in {img_dir}: {_show(both)}; a stem must be unique")
        _check_storable_stems(list(found.values()))
        unl = [Sample(s, p, None, group(s), subset) for s, p in found.items()]
    known = [s.stem for s in [*samples, *unl]]
    fixed = {k: read_stem_list(_resolve(root, v), known) for k, v in (splits or {}).items()}
    return DataSource(name=name or root.resolve().name, root=root, classes=classes, samples=samples,
                      decode_mask=decoder, unlabeled=unl, fixed_splits=fixed)
