"""Folder sources, split files, presets on fake layouts, and inspect on every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from semiseg.data import presets
from semiseg.data.classes import ClassTable
from semiseg.data.inspect import inspect_source, inspect_spec, render_report
from semiseg.data.presets import load_source
from semiseg.data.sources import folder_source, read_stem_list, write_stem_list
from semiseg.errors import DataError

THREE = ClassTable(("background", "cat", "dog"))


def put_image(path: Path, hw: tuple[int, int] = (8, 10), value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(path)


def put_mask(path: Path, m: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m.astype(bool) if mode == "1" else m.astype(np.uint8)).save(path)


def folder(root: Path, stems: list[str], *, img_ext: str = ".jpg", mask_ext: str = ".png",
           hw: tuple[int, int] = (8, 10)) -> Path:
    for i, s in enumerate(stems):
        put_image(root / "images" / f"{s}{img_ext}", hw)
        m = np.zeros(hw, np.uint8)
        m[: i % hw[0] + 1, :3] = 1
        put_mask(root / "masks" / f"{s}{mask_ext}", m)
    return root


# ----------------------------------------------------------------------------- pairing
def test_pairs_by_stem_sorted_with_odd_names(tmp_path: Path) -> None:
    stems = ["zeta", "a b c", "ñandú", "日本語", "B"]
    folder(tmp_path, stems)
    put_image(tmp_path / "images" / "upper.JPG")
    put_mask(tmp_path / "masks" / "upper.PNG", np.zeros((8, 10)))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    put_image(tmp_path / "images" / ".hidden.jpg")
    src = folder_source(tmp_path)
    assert [s.stem for s in src.samples] == sorted([*stems, "upper"])
    for s in src.samples:
        assert s.image.parent.name == "images" and s.mask is not None and s.mask.stem == s.stem
    assert src.classes.is_binary and src.unlabeled == [] and src.name == tmp_path.name
    m = src.decode_mask(src.by_stem()["ñandú"].mask)  # type: ignore[arg-type]
    assert m.dtype == np.uint8 and m.sum() == 3 * (stems.index("ñandú") + 1)


def test_unlabeled_folder(tmp_path: Path) -> None:
    folder(tmp_path, ["a", "b"])
    for s in ("u2", "u1"):
        put_image(tmp_path / "raw" / f"{s}.png")
    src = folder_source(tmp_path, unlabeled="raw", classes=ClassTable.binary("x"))
    assert [s.stem for s in src.unlabeled] == ["u1", "u2"]
    assert all(s.mask is None for s in src.unlabeled)
    assert set(src.by_stem()) == {"a", "b", "u1", "u2"}
    put_image(tmp_path / "raw" / "a.png")
    with pytest.raises(DataError, match="stems also in"):
        folder_source(tmp_path, unlabeled="raw")


@pytest.mark.parametrize("case, match", [
    ("image_without_mask", "no mask for 1 images.*'c'"),
    ("mask_without_image", "no image for 1 masks.*'d'"),
    ("duplicate_stem", r"same stem \(a\.jpg / a\.png\)"),
    ("empty_images", "no images"),
    ("missing_masks", "masks folder not found"),
])
def test_bad_folders(tmp_path: Path, case: str, match: str) -> None:
    folder(tmp_path, ["a", "b"])
    if case == "image_without_mask":
        put_image(tmp_path / "images" / "c.jpg")
    elif case == "mask_without_image":
        put_mask(tmp_path / "masks" / "d.png", np.zeros((8, 10)))
    elif case == "duplicate_stem":
        put_image(tmp_path / "images" / "a.png")
    elif case == "empty_images":
        for p in (tmp_path / "images").iterdir():
            p.unlink()
    elif case == "missing_masks":
        (tmp_path / "masks").rename(tmp_path / "labels")
    with pytest.raises(DataError, match=match):
        folder_source(tmp_path)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        folder_source(tmp_path / "nope")


def test_class_inference(tmp_path: Path) -> None:
    a = folder(tmp_path / "a", ["x", "y"])  # index PNG 0/1 -> binary
    assert folder_source(a).classes.names == ("background", "object")
    b = tmp_path / "b"
    for i, s in enumerate(["p", "q", "r"]):
        put_image(b / "images" / f"{s}.jpg")
        put_mask(b / "masks" / f"{s}.png", np.array([[0, i + 1], [255, 0]]))
    src = folder_source(b)
    assert src.classes.names == ("class_0", "class_1", "class_2", "class_3")
    c = tmp_path / "c"  # JPEG black/white masks -> threshold, binary
    put_image(c / "images" / "k.jpg")
    (c / "masks").mkdir()
    Image.fromarray(np.full((8, 10), 250, np.uint8)).save(c / "masks" / "k.jpg")
    src = folder_source(c)
    assert src.classes.is_binary and src.decode_mask(src.samples[0].mask).min() == 1  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- split files
def test_split_files(tmp_path: Path) -> None:
    folder(tmp_path, ["a", "b b", "c"])
    write_stem_list(tmp_path / "test.txt", ["c", "b b"], known=["a", "b b", "c"])
    assert (tmp_path / "test.txt").read_text() == "c\nb b\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    src = folder_source(tmp_path, splits={"test": "test.txt"})
    assert src.fixed_splits == {"test": ["c", "b b"]}
    (tmp_path / "x.txt").write_text("# comment\n\n a \n")
    assert read_stem_list(tmp_path / "x.txt") == ["a"]
    (tmp_path / "bad.txt").write_text("a\nzz\nyy\n")
    with pytest.raises(DataError, match=r"bad\.txt: 2 stems not in the data: 'zz', 'yy'"):
        folder_source(tmp_path, splits={"test": "bad.txt"})
    (tmp_path / "ext.txt").write_text("a.jpg\n")
    with pytest.raises(DataError, match="without the file extension"):
        read_stem_list(tmp_path / "ext.txt", known=["a"])
    (tmp_path / "dup.txt").write_text("a\na\n")
    with pytest.raises(DataError, match="twice"):
        read_stem_list(tmp_path / "dup.txt")
    with pytest.raises(DataError, match="not in the data"):
        write_stem_list(tmp_path / "w.txt", ["q"], known=["a"])
    with pytest.raises(DataError, match="cannot be stored"):
        write_stem_list(tmp_path / "w.txt", ["a\nb"])
    with pytest.raises(DataError, match="not found"):
        read_stem_list(tmp_path / "none.txt")


# ----------------------------------------------------------------------------- inspect
def test_inspect_collects_every_problem(tmp_path: Path) -> None:
    folder(tmp_path, ["a", "b", "c", "d", "e"], img_ext=".png")
    good = (tmp_path / "images" / "b.png").read_bytes()
    (tmp_path / "images" / "b.png").write_bytes(good[: len(good) // 2])      # truncated image
    put_image(tmp_path / "images" / "c.png", (9, 10))                         # size mismatch
    put_mask(tmp_path / "masks" / "d.png", np.full((8, 10), 7))               # outside the table
    (tmp_path / "masks" / "e.png").write_bytes(b"garbage")                    # undecodable mask
    src = folder_source(tmp_path, classes=THREE, mask_format="index")
    rep = inspect_source(src)
    assert not rep.usable and rep.num_problems == 4
    text = "\n".join(rep.problems)
    assert "b.png: cannot decode" in text
    assert "c.png: mask size 8x10 differs from image size 9x10" in text
    assert "d.png: mask values 7 outside" in text
    assert "e.png: cannot decode" in text
    capped = inspect_source(src, max_problems=2)
    assert len(capped.problems) == 2 and capped.num_problems == 4


def test_inspect_counts_sizes_shares_and_empty_masks(tmp_path: Path) -> None:
    put_image(tmp_path / "images" / "a.jpg", (4, 5))
    put_mask(tmp_path / "masks" / "a.png", np.array([[1] * 5, [2] * 5, [0] * 5, [255] * 5]))
    put_image(tmp_path / "images" / "b.jpg", (2, 3))
    put_mask(tmp_path / "masks" / "b.png", np.zeros((2, 3)))                   # all background
    put_image(tmp_path / "images" / "c.jpg", (2, 3))
    put_mask(tmp_path / "masks" / "c.png", np.array([[0, 255, 255], [255, 255, 255]]))  # bg + void only
    put_image(tmp_path / "raw" / "u.jpg", (6, 7))
    rep = inspect_source(folder_source(tmp_path, classes=THREE, unlabeled="raw"))
    assert rep.usable and rep.problems == []
    assert (rep.num_labeled, rep.num_unlabeled) == (3, 1)
    assert rep.image_sizes == {(2, 3): 2, (4, 5): 1, (6, 7): 1}
    assert rep.min_size == (2, 3) and rep.max_size == (6, 7)
    assert rep.mask_values == {0: 12, 1: 5, 2: 5, 255: 10}
    assert rep.class_shares == pytest.approx({"background": 12 / 22, "cat": 5 / 22, "dog": 5 / 22})
    assert rep.void_share == pytest.approx(10 / 32)
    assert rep.empty_masks == ["b", "c"]
    console = Console(record=True, width=120)
    render_report(rep, console)
    out = console.export_text()
    assert "usable" in out and "54.55 %" in out and "5x4" in out


def test_inspect_spec_turns_load_error_into_report(tmp_path: Path) -> None:
    folder(tmp_path, ["a"])
    put_image(tmp_path / "images" / "orphan.jpg")
    rep = inspect_spec(tmp_path)
    assert not rep.usable and "orphan" in rep.problems[0]
    console = Console(record=True, width=200)
    render_report(rep, console)
    assert "orphan" in console.export_text()


# ----------------------------------------------------------------------------- presets / load_source
def test_load_source_folder_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder(tmp_path / "mine", ["a", "b"])
    assert len(load_source(tmp_path / "mine").samples) == 2
    assert len(load_source(str(tmp_path / "mine"), mask_format="index").samples) == 2
    with pytest.raises(DataError, match="neither a preset"):
        load_source("kvasir")
    monkeypatch.delenv("SEMISEG_DATA", raising=False)
    with pytest.raises(DataError, match="--root"):
        load_source("camvid")
    with pytest.raises(DataError, match="not found"):
        load_source("camvid", root=tmp_path / "nothing")
    with pytest.raises(DataError, match="no options"):
        load_source("camvid", root=tmp_path / "mine", foo=1)


def test_camvid_on_fake_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "camvid"
    for stem in ("0016E5_07959", "0016E5_08160", "0001TP_006690", "0016E5_08159", "0016E5_07958"):
        put_image(root / "images" / f"{stem}.png")
        put_mask(root / "masks" / f"{stem}.png", np.array([[0, 11], [10, 3]]))
    monkeypatch.setenv("SEMISEG_DATA", str(tmp_path))
    src = load_source("camvid")
    assert src.fixed_splits["test"] == ["0016E5_07959", "0016E5_08159"]
    assert {s.group for s in src.samples} == {"0016E5", "0001TP"}
    assert src.classes.num_classes == 11 and src.classes.colors[4] == (60, 40, 222)
    np.testing.assert_array_equal(src.decode_mask(src.samples[0].mask), [[0, 255], [10, 3]])  # type: ignore


def test_camvid_official_split_on_fake_layout(tmp_path: Path) -> None:
    root = tmp_path / "camvid-full"
    stems = ("0001TP_006690", "0016E5_07959", "0001TP_008550", "Seq05VD_f00000")
    for stem in stems:
        put_image(root / "images" / f"{stem}.jpg")
        put_mask(root / "masks" / f"{stem}.png", np.array([[0, 11], [10, 3]]))
    with pytest.raises(DataError, match="split=official needs the complete CamVid"):
        load_source("camvid", root=root, split="official")  # no official-split/ yet: the subset's layout
    (root / "official-split").mkdir()
    (root / "official-split" / "train.txt").write_text("0001TP_006690\n")
    (root / "official-split" / "val.txt").write_text("0016E5_07959\n")
    (root / "official-split" / "test.txt").write_text("0001TP_008550\nSeq05VD_f00000\n")
    src = load_source("camvid", root=root, split="official")
    assert src.fixed_splits == {"test": ["0001TP_008550", "Seq05VD_f00000"], "val": ["0016E5_07959"]}
    assert load_source("camvid", root=root).fixed_splits == src.fixed_splits  # auto: the official split, found
    with pytest.raises(DataError, match="takes auto or official"):
        load_source("camvid", root=root, split="mine")


def test_cvc_and_polyp_on_fake_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cvc-clinicdb" / "masks").mkdir(parents=True)
    (tmp_path / "kvasir-seg" / "masks").mkdir(parents=True)
    for n in ("1", "25", "26", "612"):
        put_image(tmp_path / "cvc-clinicdb" / "images" / f"{n}.jpg")
        Image.fromarray(np.full((8, 10, 3), 240, np.uint8)).save(tmp_path / "cvc-clinicdb" / "masks" / f"{n}.jpg")
    for s in ("k1", "k2"):
        put_image(tmp_path / "kvasir-seg" / "images" / f"{s}.jpg")
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "kvasir-seg" / "masks" / f"{s}.jpg")
    cvc = load_source("cvc-clinicdb", root=tmp_path / "cvc-clinicdb")
    assert {s.stem: s.group for s in cvc.samples} == {"1": "seq01", "25": "seq01", "26": "seq02", "612": "seq29"}
    split = tmp_path / "test.txt"
    split.write_text("cvc-clinicdb/612\nkvasir-seg/k2\n")
    monkeypatch.setattr(presets, "packaged_split", lambda *parts: split)
    pol = load_source("polyp", root=tmp_path)
    assert [s.stem for s in pol.samples] == ["kvasir-seg/k1", "kvasir-seg/k2", "cvc-clinicdb/1",
                                            "cvc-clinicdb/25", "cvc-clinicdb/26", "cvc-clinicdb/612"]
    assert pol.samples[0].group == "kvasir-seg/k1" and pol.samples[-1].group == "cvc-clinicdb/seq29"
    assert {s.subset for s in pol.samples} == {"kvasir-seg", "cvc-clinicdb"}
    assert pol.fixed_splits == {"test": ["cvc-clinicdb/612", "kvasir-seg/k2"]}
    assert pol.decode_mask(pol.samples[-1].mask).min() == 1  # type: ignore[arg-type]
    monkeypatch.setattr(presets, "packaged_split", lambda *parts: None)
    assert load_source("polyp", root=tmp_path).fixed_splits == {}
    put_image(tmp_path / "cvc-clinicdb" / "images" / "613.jpg")
    put_image(tmp_path / "cvc-clinicdb" / "masks" / "613.jpg")
    with pytest.raises(DataError, match="'613' is not a frame number"):
        load_source("cvc-clinicdb", root=tmp_path / "cvc-clinicdb")


def test_chase_groups_children(tmp_path: Path) -> None:
    for s in ("Image_01L", "Image_01R", "Image_02L"):
        put_image(tmp_path / "images" / f"{s}.jpg")
        put_mask(tmp_path / "masks" / f"{s}.png", np.eye(8, 10, dtype=bool), mode="1")
    src = load_source("chase-db1", root=tmp_path)
    assert [s.group for s in src.samples] == ["child01", "child01", "child02"]
    np.testing.assert_array_equal(src.decode_mask(src.samples[0].mask), np.eye(8, 10))  # type: ignore


def fake_voc(root: Path, aug: bool) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    stems = [f"2007_00000{i}" for i in range(6)]
    for s in stems:
        put_image(voc / "JPEGImages" / f"{s}.jpg")
        m = np.array([[0, 15], [255, 20]])
        pal = Image.fromarray(m.astype(np.uint8), "P")
        pal.putpalette([v for c in presets.VOC.colors for v in c] + [224, 224, 192] * 235)
        (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        pal.save(voc / "SegmentationClass" / f"{s}.png")
        if aug:
            put_mask(voc / "SegmentationClassAug" / f"{s}.png", m)
    put_image(voc / "JPEGImages" / "2012_999999.jpg")  # an image in no segmentation list
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(stems[:2]) + "\n")
    (lists / "val.txt").write_text("\n".join(stems[4:]) + "\n")
    if aug:
        (lists / "train_aug.txt").write_text("\n".join(stems[:4]) + "\n")
    return voc


@pytest.mark.parametrize("aug", [False, True])
def test_pascal_voc_on_fake_layout(tmp_path: Path, aug: bool) -> None:
    voc = fake_voc(tmp_path, aug)
    src = load_source("pascal-voc", root=tmp_path)
    assert src.root == voc and src.classes.num_classes == 21
    assert len(src.samples) == (6 if aug else 4)
    assert src.fixed_splits == {"test": ["2007_000004", "2007_000005"]}
    assert src.samples[0].mask.parent.name == ("SegmentationClassAug" if aug else "SegmentationClass")  # type: ignore
    np.testing.assert_array_equal(src.decode_mask(src.samples[0].mask), [[0, 15], [255, 20]])  # type: ignore
    assert src.classes.colors[15] == (192, 128, 128)  # person, the well-known VOC colour
    if aug:
        assert len(load_source("pascal-voc", root=voc, train_list="train").samples) == 4
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000004\nmissing_one\n")
    with pytest.raises(DataError, match="missing_one"):
        load_source("pascal-voc", root=tmp_path)


def test_cityscapes_on_fake_layout(tmp_path: Path) -> None:
    frames = {("train", "aachen"): ["aachen_000000_000019", "aachen_000001_000019"],
              ("train", "bremen"): ["bremen_000000_000019"], ("val", "lindau"): ["lindau_000000_000019"]}
    ids = np.array([[7, 8, 0], [26, 33, 1]])
    for (split, city), stems in frames.items():
        for s in stems:
            put_image(tmp_path / "leftImg8bit" / split / city / f"{s}_leftImg8bit.png", (2, 3))
            put_mask(tmp_path / "gtFine" / split / city / f"{s}_gtFine_labelIds.png", ids)
            put_mask(tmp_path / "gtFine" / split / city / f"{s}_gtFine_color.png", ids)  # ignored
    src = load_source("cityscapes", root=tmp_path)
    assert [s.stem for s in src.samples] == sorted(s for v in frames.values() for s in v)
    assert {s.stem: s.group for s in src.samples}["bremen_000000_000019"] == "bremen"
    assert src.fixed_splits == {"test": ["lindau_000000_000019"]}
    np.testing.assert_array_equal(src.decode_mask(src.samples[0].mask), [[0, 1, 255], [13, 18, 255]])  # type: ignore
    assert inspect_source(src).usable
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match="missing label file"):
        load_source("cityscapes", root=tmp_path)
