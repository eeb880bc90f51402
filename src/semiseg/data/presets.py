"""Named dataset presets: each knows its folder layout, class table, mask decoding, groups and splits.

This registry is the *only* place that knows dataset names; everything else takes a DataSource.
``load_source(spec)`` accepts a preset name or a folder path (-> ``folder_source``). A preset's root
defaults to ``$SEMISEG_DATA/<default dir>``. Layout details and the facts behind groups and fixed
splits are in each builder's docstring.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from semiseg.data.classes import ClassTable
from semiseg.data.decode import IndexMask, ThresholdMask
from semiseg.data.sources import folder_source, list_images, read_stem_list
from semiseg.data.synthetic import generate_synthetic, params_hash, synthetic_classes, synthetic_params
from semiseg.data.types import DataSource, Sample
from semiseg.errors import DataError

POLYP = ClassTable.binary("polyp")
VESSEL = ClassTable.binary("vessel")
CAMVID = ClassTable(
    ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
     "Bicyclist"),
    ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
     (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)))
CAMVID_VOID = 11
CAMVID_TEST_FRAMES = (7959, 8159)  # official val frames of sequence 0016E5, used as the fixed test split


def _voc_colors(n: int = 21) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC palette: bits of the class index spread over the high bits of R, G and B."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


VOC = ClassTable(
    ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
     "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
     "tvmonitor"), _voc_colors())

# Cityscapes: labelId -> trainId for the 19 evaluated classes; every other labelId is void.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES = ClassTable(
    ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
     "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"),
    ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
     (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
     (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)))

# CVC-ClinicDB video sequences: (first frame, last frame) of sequence i + 1 (from the dataset README).
CVC_SEQUENCES = ((1, 25), (26, 50), (51, 67), (68, 78), (79, 103), (104, 126), (127, 151), (152, 177),
                 (178, 199), (200, 205), (206, 227), (228, 252), (253, 277), (278, 297), (298, 317),
                 (318, 342), (343, 363), (364, 383), (384, 408), (409, 428), (429, 447), (448, 466),
                 (467, 478), (479, 503), (504, 528), (529, 546), (547, 571), (572, 591), (592, 612))


@dataclass(frozen=True)
class Preset:
    """A dataset preset: ``build(root, **options)``; ``default_dir`` is relative to ``$SEMISEG_DATA``."""

    build: Callable[..., DataSource]
    default_dir: str
    summary: str


def _no_options(name: str, options: dict[str, object]) -> None:
    if options:
        raise DataError(f"preset {name!r} takes no options (got {', '.join(sorted(options))})")


def cvc_sequence(stem: str) -> int:
    """The video sequence (1..29) of CVC-ClinicDB frame ``stem`` ("1".."612")."""
    try:
        frame = int(stem)
    except ValueError:
        frame = -1
    for i, (lo, hi) in enumerate(CVC_SEQUENCES):
        if lo <= frame <= hi:
            return i + 1
    raise DataError(f"CVC-ClinicDB: file stem {stem!r} is not a frame number 1..612")


def kvasir_seg(root: Path, **options: object) -> DataSource:
    """Kvasir-SEG: ``images/*.jpg`` + ``masks/*.jpg`` (JPEG noise, threshold 128); each image its own group."""
    _no_options("kvasir-seg", options)
    return folder_source(root, classes=POLYP, mask_format=ThresholdMask(POLYP, 128), name="kvasir-seg",
                         group_of=lambda s: s, subset="kvasir-seg")


def cvc_clinicdb(root: Path, **options: object) -> DataSource:
    """CVC-ClinicDB: frames ``1``..``612`` (JPEG masks, threshold 128); group = video sequence ``seqNN``."""
    _no_options("cvc-clinicdb", options)
    return folder_source(root, classes=POLYP, mask_format=ThresholdMask(POLYP, 128), name="cvc-clinicdb",
                         group_of=lambda s: f"seq{cvc_sequence(s):02d}", subset="cvc-clinicdb")


def _prefixed(src: DataSource, prefix: str) -> list[Sample]:
    return [replace(s, stem=f"{prefix}/{s.stem}", group=f"{prefix}/{s.group}") for s in src.samples]


def packaged_split(*parts: str) -> Path | None:
    """A split file committed in the package (``semiseg/splits/...``), or None when absent."""
    res = resources.files("semiseg").joinpath("splits", *parts)
    return Path(str(res)) if res.is_file() else None


def polyp(root: Path, **options: object) -> DataSource:
    """Kvasir-SEG + CVC-ClinicDB from ``root/kvasir-seg`` and ``root/cvc-clinicdb``.

    Stems become ``kvasir-seg/<id>`` and ``cvc-clinicdb/<n>`` (groups likewise prefixed), subsets name
    the part. ``fixed_splits["test"]`` is the committed ``semiseg/splits/polyp/test.txt`` when present.
    """
    _no_options("polyp", options)
    parts = [kvasir_seg(root / "kvasir-seg"), cvc_clinicdb(root / "cvc-clinicdb")]
    samples = [s for src in parts for s in _prefixed(src, src.name)]
    fixed: dict[str, list[str]] = {}
    test = packaged_split("polyp", "test.txt")
    if test is not None:
        fixed["test"] = read_stem_list(test, [s.stem for s in samples])
    return DataSource("polyp", root, POLYP, samples, ThresholdMask(POLYP, 128), fixed_splits=fixed)


def camvid_test_frame(stem: str) -> bool:
    """True for the 101 official CamVid val frames (0016E5_07959 .. 0016E5_08159), our fixed test set."""
    m = re.fullmatch(r"0016E5_(\d+)", stem)
    return bool(m) and CAMVID_TEST_FRAMES[0] <= int(m.group(1)) <= CAMVID_TEST_FRAMES[1]


def camvid(root: Path, **options: object) -> DataSource:
    """CamVid (SegNet version): ``images/*`` + ``masks/*.png`` index masks, 11 classes, 11 = void.

    Group = the sequence prefix (0001TP, 0006R0, 0016E5, ...): frames of one sequence are near-duplicates, so a
    split that separates them leaks. The complete set (701 frames with ``official-split/{train,val,test}.txt``)
    fixes the official split: test = the 233 test frames, validation = the 101 val frames, and the 367 train
    frames are the labeled + unlabeled pool. A folder without ``official-split/`` (the older 224-frame subset)
    fixes only test, as the official val frames (protocol camvid-subset-v1). Option ``split``: ``auto`` (that
    rule) or ``official`` (the complete set required: the camvid protocol).
    """
    split = options.pop("split", "auto")
    _no_options("camvid", options)
    if split not in ("auto", "official"):
        raise DataError(f"data.options.split={split!r}: preset 'camvid' takes auto or official")
    src = folder_source(root, classes=CAMVID, mask_format=IndexMask(CAMVID, void_values=(CAMVID_VOID, 255)),
                        name="camvid", group_of=lambda s: s.split("_", 1)[0])
    official = Path(root) / "official-split"
    if split == "official" and not official.is_dir():
        raise DataError(f"{official}: not found; data.options.split=official needs the complete CamVid with its "
                        "official split (701 frames, e.g. camvid-full/), not the 224-frame subset")
    if official.is_dir():
        known = [s.stem for s in src.samples]
        src.fixed_splits["test"] = read_stem_list(official / "test.txt", known)
        src.fixed_splits["val"] = read_stem_list(official / "val.txt", known)
    else:
        src.fixed_splits["test"] = [s.stem for s in src.samples if camvid_test_frame(s.stem)]
    return src


def chase_db1(root: Path, **options: object) -> DataSource:
    """CHASE_DB1: ``images/*.jpg`` + 1-bit ``masks/*.png``; group = child (Image_01L with Image_01R)."""
    _no_options("chase-db1", options)

    def child(stem: str) -> str:
        m = re.fullmatch(r"Image_(\d+)[LR]", stem)
        return f"child{m.group(1)}" if m else stem

    return folder_source(root, classes=VESSEL, mask_format=IndexMask(VESSEL), name="chase-db1", group_of=child)


def _voc_dir(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DataError(f"{root}: no JPEGImages/ here nor in VOC2012/ or VOCdevkit/VOC2012/ (PASCAL VOC layout)")


def pascal_voc(root: Path, *, train_list: str | None = None, list_dir: str | Path | None = None,
               masks: str | None = None, **options: object) -> DataSource:
    """PASCAL VOC 2012: ``JPEGImages/`` + ``SegmentationClassAug/`` (SBD, index PNG) or ``SegmentationClass/``.

    Samples = the train list (``train`` 1464 or ``train_aug`` 10582; default ``train_aug`` when the aug
    masks and list exist) plus ``val``, read from ``ImageSets/Segmentation`` or ``list_dir``;
    ``fixed_splits["test"]`` = val. 21 classes; 255 (object boundaries) = void.
    """
    _no_options("pascal-voc", options)
    voc = _voc_dir(root)
    lists = Path(list_dir) if list_dir is not None else voc / "ImageSets" / "Segmentation"
    aug = voc / "SegmentationClassAug"
    mask_dir = voc / (masks or ("SegmentationClassAug" if aug.is_dir() else "SegmentationClass"))
    if train_list is None:
        train_list = "train_aug" if aug.is_dir() and (lists / "train_aug.txt").is_file() else "train"
    imgs, msks = list_images(voc / "JPEGImages"), list_images(mask_dir, what="masks")
    train, val = read_stem_list(lists / f"{train_list}.txt"), read_stem_list(lists / "val.txt")
    samples = []
    for stem in sorted(set(train) | set(val)):
        if stem not in imgs or stem not in msks:
            where = voc / "JPEGImages" if stem not in imgs else mask_dir
            raise DataError(f"{where}: no file for {stem!r}, listed in {lists}")
        samples.append(Sample(stem, imgs[stem], msks[stem]))
    return DataSource("pascal-voc", voc, VOC, samples, IndexMask(VOC), fixed_splits={"test": sorted(val)})


def cityscapes(root: Path, **options: object) -> DataSource:
    """Cityscapes fine: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``.

    labelIds map to the 19 train ids (others void); stem = ``<city>_<seq>_<frame>``, group = city;
    ``fixed_splits["test"]`` = val.
    """
    _no_options("cityscapes", options)
    samples, val = [], []
    for split in ("train", "val"):
        img_root = root / "leftImg8bit" / split
        if not img_root.is_dir():
            raise DataError(f"{img_root}: Cityscapes folder not found")
        for img in sorted(img_root.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            mask = root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if not mask.is_file():
                raise DataError(f"{mask}: missing label file for {img}")
            samples.append(Sample(stem, img, mask, group=img.parent.name))
            if split == "val":
                val.append(stem)
    if not samples:
        raise DataError(f"{root / 'leftImg8bit'}: no *_leftImg8bit.png images")
    samples.sort(key=lambda s: s.stem)
    return DataSource("cityscapes", root, CITYSCAPES, samples,
                      IndexMask(CITYSCAPES, void_values=(), mapping=CITYSCAPES_TRAIN_IDS),
                      fixed_splits={"test": sorted(val)})


def cache_dir() -> Path:
    """``$SEMISEG_CACHE`` or ``~/.cache/semiseg``: where generated data lives."""
    env = os.environ.get("SEMISEG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "semiseg"


def synthetic(root: Path | None, *, kind: str = "binary", n: int = 300, size: tuple[int, int] | int = (128, 128),
              seed: int = 0, difficulty: str = "hard", **options: object) -> DataSource:
    """Generated data (``semiseg.data.synthetic``) cached in ``root`` or ``$SEMISEG_CACHE/synthetic/<hash>``."""
    _no_options("synthetic", options)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    params = synthetic_params(n, hw, kind, seed, difficulty)
    out = Path(root) if root is not None else cache_dir() / "synthetic" / params_hash(params)
    generate_synthetic(out, n=n, size=hw, kind=kind, seed=seed, difficulty=difficulty)
    classes = synthetic_classes(kind)
    return folder_source(out, classes=classes, mask_format=IndexMask(classes), name=f"synthetic-{kind}")


PRESETS: dict[str, Preset] = {
    "kvasir-seg": Preset(kvasir_seg, "kvasir-seg", "Kvasir-SEG polyps, 1000 JPEG pairs, binary"),
    "cvc-clinicdb": Preset(cvc_clinicdb, "cvc-clinicdb", "CVC-ClinicDB polyps, 612 frames of 29 videos"),
    "polyp": Preset(polyp, "", "Kvasir-SEG + CVC-ClinicDB (root holds both folders)"),
    "camvid": Preset(camvid, "camvid", "CamVid street scenes, 11 classes + void"),
    "chase-db1": Preset(chase_db1, "chase_db1", "CHASE_DB1 retinal vessels, 28 pairs"),
    "pascal-voc": Preset(pascal_voc, "pascal-voc", "PASCAL VOC 2012 (+SBD aug), 21 classes"),
    "cityscapes": Preset(cityscapes, "cityscapes", "Cityscapes fine, 19 train ids"),
    "synthetic": Preset(synthetic, "",
                        "generated data (kind=binary|multiclass, n, size, seed, difficulty=hard|moderate)"),
}


def _preset_root(name: str, preset: Preset, root: str | Path | None) -> Path:
    if root is None:
        env = os.environ.get("SEMISEG_DATA")
        if not env:
            where = f"the folder holding {preset.default_dir}/" if preset.default_dir else "its data folder"
            raise DataError(f"preset {name!r}: no data folder given; pass root=PATH (CLI: --root PATH) or "
                            f"set SEMISEG_DATA to {where}")
        root = Path(env) / preset.default_dir
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data folder of preset {name!r} not found (pass root=PATH / --root PATH)")
    return root


def load_source(spec: str | Path, root: str | Path | None = None, **options: object) -> DataSource:
    """A DataSource from a preset name (see ``PRESETS``) or a folder path (-> ``folder_source``).

    ``options`` go to the preset builder or to ``folder_source`` (e.g. ``mask_format``, ``unlabeled``).
    """
    if isinstance(spec, str) and spec in PRESETS:
        preset = PRESETS[spec]
        if spec == "synthetic":
            return preset.build(Path(root) if root is not None else None, **options)
        return preset.build(_preset_root(spec, preset, root), **options)
    path = Path(spec).expanduser()
    if root is not None:
        raise DataError(f"{spec}: root is only for presets ({', '.join(PRESETS)}); give the folder itself")
    if not path.is_dir():
        raise DataError(f"{spec}: neither a preset ({', '.join(PRESETS)}) nor an existing data folder")
    try:
        return folder_source(path, **options)  # type: ignore[arg-type]
    except TypeError as e:
        raise DataError(f"{spec}: bad option for a folder source ({e}); data.options must hold folder options "
                        "(e.g. mask_format, unlabeled), not a preset's") from e

