"""Presets on the team's real data (../shared/data or $SEMISEG_SHARED_DATA); skipped when it is absent.

``inspect`` decodes every file, so the fast tests inspect an evenly spread subset; the full Kvasir-SEG
inspection is marked slow.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.data.inspect import InspectReport, inspect_source
from semiseg.data.presets import CVC_SEQUENCES, load_source
from semiseg.data.types import DataSource

SHARED = Path(os.environ.get("SEMISEG_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def data_dir(name: str) -> Path:
    path = SHARED / name
    if not (path / "images").is_dir():
        pytest.skip(f"real data {name!r} not found under {SHARED} (set SEMISEG_SHARED_DATA)")
    return path


def inspect_subset(src: DataSource, k: int) -> InspectReport:
    """Inspect every ``len/k``-th sample; it must be clean and use only table values."""
    step = max(1, len(src.samples) // k)
    sub = DataSource(src.name, src.root, src.classes, src.samples[::step], src.decode_mask)
    rep = inspect_source(sub)
    assert rep.usable, rep.problems
    assert set(rep.mask_values) <= set(range(src.classes.num_classes)) | {255}
    return rep


def test_kvasir_seg() -> None:
    src = load_source("kvasir-seg", root=data_dir("kvasir-seg"))
    assert len(src.samples) == 1000 and src.classes.names == ("background", "polyp")
    assert len({s.group for s in src.samples}) == 1000 and {s.subset for s in src.samples} == {"kvasir-seg"}
    rep = inspect_subset(src, 25)
    assert rep.empty_masks == [] and 0.05 < rep.class_shares["polyp"] < 0.3
    assert len(rep.image_sizes) > 5


def test_cvc_clinicdb() -> None:
    src = load_source("cvc-clinicdb", root=data_dir("cvc-clinicdb"))
    assert len(src.samples) == 612 and sorted(int(s.stem) for s in src.samples) == list(range(1, 613))
    sizes = Counter(s.group for s in src.samples)
    assert len(sizes) == 29
    assert [sizes[f"seq{i + 1:02d}"] for i in range(29)] == [hi - lo + 1 for lo, hi in CVC_SEQUENCES]
    rep = inspect_subset(src, 20)
    assert list(rep.image_sizes) == [(288, 384)]


def test_camvid() -> None:
    src = load_source("camvid", root=data_dir("camvid"))
    assert len(src.samples) == 224 and src.classes.num_classes == 11
    test = src.fixed_splits["test"]
    assert len(test) == 101 and test[0] == "0016E5_07959" and test[-1] == "0016E5_08159"
    assert Counter(s.group for s in src.samples) == {"0001TP": 21, "0006R0": 34, "0016E5": 169}
    rep = inspect_subset(src, 16)
    assert 255 in rep.mask_values and len(set(rep.mask_values) - {255}) == 11
    raw = np.asarray(Image.open(src.samples[0].mask))  # type: ignore[arg-type]
    decoded = src.decode_mask(src.samples[0].mask)  # type: ignore[arg-type]
    np.testing.assert_array_equal(decoded == 255, raw == 11)


def test_camvid_complete_set_fixes_the_official_split() -> None:
    from semiseg.data.splits import make_splits

    src = load_source("camvid", root=data_dir("camvid-full"))
    assert len(src.samples) == 701 and src.classes.num_classes == 11
    test, val = src.fixed_splits["test"], src.fixed_splits["val"]
    assert len(test) == 233 and len(val) == 101 and not set(test) & set(val)
    assert Counter(s.split("_", 1)[0] for s in test) == {"0001TP": 62, "Seq05VD": 171}
    assert {s.split("_", 1)[0] for s in val} == {"0016E5"}
    splits = make_splits(src, seed=0, labeled=0.125, val=0.1, test=0.1, group_aware=False)
    assert splits.test == sorted(test) and splits.val == sorted(val)  # the config's shares yield to the fixed lists
    assert len(splits.labeled) == 46 and len(splits.labeled) + len(splits.unlabeled) == 367  # 1/8 of train
    assert make_splits(src, seed=1, labeled=0.125, val=0.1, group_aware=False).labeled != splits.labeled


def test_chase_db1() -> None:
    src = load_source("chase-db1", root=data_dir("chase_db1"))
    assert len(src.samples) == 28 and len({s.group for s in src.samples}) == 14
    rep = inspect_subset(src, 5)
    assert 0.04 < rep.class_shares["vessel"] < 0.1


def test_polyp_combined() -> None:
    data_dir("kvasir-seg")
    data_dir("cvc-clinicdb")
    src = load_source("polyp", root=SHARED)
    assert len(src.samples) == 1612 and len(src.by_stem()) == 1612
    assert Counter(s.subset for s in src.samples) == {"kvasir-seg": 1000, "cvc-clinicdb": 612}
    if "test" in src.fixed_splits:  # the committed benchmark split, when present, names real stems
        assert set(src.fixed_splits["test"]) <= set(src.by_stem())


@pytest.mark.slow
def test_inspect_full_kvasir() -> None:
    rep = inspect_source(load_source("kvasir-seg", root=data_dir("kvasir-seg")))
    assert rep.usable and rep.num_labeled == 1000 and rep.empty_masks == []
    assert len(rep.image_sizes) == 333
