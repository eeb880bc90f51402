"""Splits: seeded, disjoint, complete, group-aware, fixed splits respected; the committed test splits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from semiseg.data.classes import ClassTable
from semiseg.data.splits import (
    Splits,
    camvid_test_split,
    make_splits,
    packaged_split,
    polyp_test_split,
)
from semiseg.data.types import DataSource, Sample
from semiseg.errors import ConfigError, DataError

SHARED = Path(os.environ.get("SEMISEG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _source(n: int = 100, groups: list[int] | None = None, unlabeled: int = 0,
            fixed: dict[str, list[str]] | None = None) -> DataSource:
    """``n`` samples ``s000..``; with ``groups`` (sizes), consecutive samples form groups g0, g1, ..."""
    owner: list[str | None] = [None] * n
    if groups is not None:
        assert sum(groups) == n
        owner = [f"g{gi}" for gi, size in enumerate(groups) for _ in range(size)]
    samples = [Sample(f"s{i:03d}", Path(f"i{i}.png"), Path(f"m{i}.png"), owner[i]) for i in range(n)]
    unl = [Sample(f"u{i:03d}", Path(f"u{i}.png")) for i in range(unlabeled)]
    return DataSource("fake", None, ClassTable.binary("x"), samples, lambda p: None,  # type: ignore[arg-type]
                      unlabeled=unl, fixed_splits=fixed or {})


def _check_partition(sp: Splits, src: DataSource) -> None:
    all_stems = [s.stem for s in [*src.samples, *src.unlabeled]]
    parts = [sp.labeled, sp.unlabeled, sp.val, sp.test]
    assert sorted(x for p in parts for x in p) == sorted(all_stems)  # complete and disjoint
    for p in parts:
        assert p == sorted(p)


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    src = _source(200)
    a = make_splits(src, seed=0, labeled=0.2, val=0.1, test=0.1)
    b = make_splits(src, seed=0, labeled=0.2, val=0.1, test=0.1)
    c = make_splits(src, seed=1, labeled=0.2, val=0.1, test=0.1)
    assert a == b and a != c and set(a.test) != set(c.test)
    _check_partition(a, src)


def test_ratios_apply_in_order_test_val_labeled() -> None:
    src = _source(1000, unlabeled=7)
    sp = make_splits(src, seed=0, labeled=0.2, val=0.1, test=0.1)
    # BENCHMARK.md: 10% test, 10% of the rest val, 20% of the remaining labeled
    assert (len(sp.test), len(sp.val), len(sp.labeled)) == (100, 90, 162)
    assert len(sp.unlabeled) == 1000 - 100 - 90 - 162 + 7
    assert {f"u{i:03d}" for i in range(7)} <= set(sp.unlabeled)
    _check_partition(sp, src)


def test_counts_and_ratios() -> None:
    src = _source(50)
    sp = make_splits(src, seed=3, labeled=5, val=10, test=None)
    assert (len(sp.labeled), len(sp.val), len(sp.test), len(sp.unlabeled)) == (5, 10, 0, 35)
    assert len(make_splits(src, seed=3, labeled=1, val=0).labeled) == 1
    oracle = make_splits(src, seed=3, labeled=1.0, val=0.1)
    assert len(oracle.val) == 5 and len(oracle.labeled) == 45 and oracle.unlabeled == []
    tiny = make_splits(_source(4), seed=0, labeled=0.01, val=0.01)
    assert len(tiny.labeled) == 1 and len(tiny.val) == 1  # a ratio > 0 gives at least one sample


def test_group_aware_splits_keep_groups_whole() -> None:
    sizes = [5, 25, 17, 11, 25, 23, 25, 26, 22, 6, 22, 25, 25, 20, 20, 25]
    src = _source(sum(sizes), groups=sizes)
    group = {s.stem: s.group for s in src.samples}
    for seed in range(5):
        sp = make_splits(src, seed=seed, labeled=0.2, val=0.1, test=0.1)
        _check_partition(sp, src)
        homes: dict[str | None, set[str]] = {}
        for name, stems in sp.as_dict().items():
            for s in stems:
                homes.setdefault(group[s], set()).add(name)
        assert all(len(h) == 1 for h in homes.values()), "a group was split"
        n = len(src.samples)
        assert abs(len(sp.test) - 0.1 * n) <= 13  # as close as groups of <= 26 allow (half the largest)
        assert 0 < len(sp.val) and 0 < len(sp.labeled)


def test_group_larger_than_twice_the_target_still_gives_one_group() -> None:
    src = _source(60, groups=[30, 30])
    sp = make_splits(src, seed=0, labeled=0.5, val=0.05)
    assert len(sp.val) == 30 and len(sp.labeled) == 30
    flat = make_splits(src, seed=0, labeled=0.5, val=0.05, group_aware=False)
    assert (len(flat.val), len(flat.labeled)) == (3, 28)


def test_fixed_test_is_respected_and_excluded() -> None:
    fixed_test = [f"s{i:03d}" for i in range(10)]
    src = _source(100, fixed={"test": fixed_test})
    sp = make_splits(src, seed=0, labeled=0.5, val=0.1)
    assert sp.test == fixed_test and len(sp.val) == 9 and len(sp.labeled) == 40
    _check_partition(sp, src)
    assert make_splits(src, seed=0, labeled=0.5, val=0.1, test=0.3) == sp  # a fixed split's amount is ignored
    drawn = make_splits(src, seed=0, labeled=0.5, val=0.1, test=0.1, fixed={})
    assert len(drawn.test) == 10 and drawn.test != fixed_test


def test_fixed_labeled_and_unlabeled() -> None:
    src = _source(30, unlabeled=2)
    sp = make_splits(src, seed=0, labeled=None, val=3,
                     fixed={"labeled": ["s001", "s002"], "unlabeled": ["u000", "s005"]})
    assert sp.labeled == ["s001", "s002"] and len(sp.val) == 3
    assert {"u000", "u001", "s005"} <= set(sp.unlabeled)
    _check_partition(sp, src)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"labeled": 60, "val": 0}, DataError, "only 50 remain"),
    ({"labeled": 0.2, "val": 51}, DataError, "only 50 remain"),
    ({"labeled": 0, "val": 0.1}, ConfigError, "count must be >= 1"),
    ({"labeled": 1.5, "val": 0.1}, ConfigError, "ratio"),
    ({"labeled": True, "val": 0.1}, ConfigError, "ratio"),
    ({"labeled": None, "val": 0.1}, ConfigError, "labeled"),
    ({"labeled": 0.2, "val": 1.0}, DataError, "no samples left"),
    ({"labeled": 0.2, "val": None, "fixed": {"test": ["s001"], "val": ["s001"]}}, DataError, "both"),
    ({"labeled": 0.2, "val": 0.1, "fixed": {"test": ["nope"]}}, DataError, "not in source"),
    ({"labeled": 0.2, "val": 0.1, "fixed": {"tset": ["s001"]}}, ConfigError, "unknown split"),
])
def test_impossible_requests_are_clear_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make_splits(_source(50), seed=0, **kwargs)


def test_fixed_split_may_cut_a_group_whose_rest_stays_together() -> None:
    src = _source(12, groups=[6, 6])  # like CamVid: official test frames share a sequence with train frames
    sp = make_splits(src, seed=0, labeled=0.5, val=0, fixed={"test": ["s000", "s001"]})
    assert sp.test == ["s000", "s001"]
    rest_g0 = {f"s{i:03d}" for i in range(2, 6)}
    assert rest_g0 <= set(sp.labeled) or rest_g0 <= set(sp.unlabeled)


def test_unlabeled_images_never_go_to_a_labeled_split() -> None:
    src = _source(10, unlabeled=3)
    with pytest.raises(DataError, match="no mask"):
        make_splits(src, seed=0, labeled=0.5, val=0, fixed={"test": ["u000"]})


def test_write_read_round_trip(tmp_path: Path) -> None:
    src = _source(40, unlabeled=2)
    sp = make_splits(src, seed=0, labeled=0.25, val=0.1, test=0.1)
    sp.write(tmp_path / "splits")
    assert (tmp_path / "splits" / "labeled.txt").read_text().splitlines() == sp.labeled
    known = [s.stem for s in [*src.samples, *src.unlabeled]]
    assert Splits.read(tmp_path / "splits", known) == sp
    (tmp_path / "splits" / "test.txt").write_text("s001\nmissing\n")
    with pytest.raises(DataError, match="not in the data"):
        Splits.read(tmp_path / "splits", known)
    (tmp_path / "splits" / "test.txt").write_text(f"{sp.labeled[0]}\n")
    with pytest.raises(DataError, match="both"):
        Splits.read(tmp_path / "splits")
    with pytest.raises(DataError, match="labeled.txt"):
        Splits.read(tmp_path / "nowhere")


def _polyp_like() -> DataSource:
    kv = [Sample(f"kvasir-seg/k{i:04d}", Path("x"), Path("y"), None, "kvasir-seg") for i in range(1000)]
    bounds = [1, 26, 51, 68, 79, 104, 127, 152, 178, 200, 206, 228, 253, 278, 298, 318, 343, 364, 384, 409,
              429, 448, 467, 479, 504, 529, 547, 572, 592, 613]
    cvc = [Sample(f"cvc-clinicdb/{n}", Path("x"), Path("y"), f"seq{q + 1}", "cvc-clinicdb")
           for q in range(29) for n in range(bounds[q], bounds[q + 1])]
    return DataSource("polyp", None, ClassTable.binary("polyp"), kv + cvc, lambda p: None)  # type: ignore


def test_polyp_test_split_rule() -> None:
    src = _polyp_like()
    test = polyp_test_split(src, seed=0)
    kv = [s for s in test if s.startswith("kvasir-seg/")]
    cvc = {int(s.split("/")[1]) for s in test if s.startswith("cvc-clinicdb/")}
    assert len(kv) == 100 and test == sorted(test)
    assert len(cvc) >= 60
    seq = {s.stem: s.group for s in src.samples}
    chosen = {seq[f"cvc-clinicdb/{n}"] for n in cvc}
    for g in chosen:  # whole sequences only
        assert {s.stem for s in src.samples if s.group == g} <= {f"cvc-clinicdb/{n}" for n in cvc}
    assert polyp_test_split(src, seed=0) == test and polyp_test_split(src, seed=1) != test


def test_camvid_test_split_rule() -> None:
    stems = ["0016E5_07958", "0016E5_07959", "0016E5_08159", "0016E5_08160", "0001TP_008000", "0006R0_f01000"]
    assert camvid_test_split(stems) == ["0016E5_07959", "0016E5_08159"]


def test_committed_splits_have_the_protocol_sizes() -> None:
    polyp = packaged_split("polyp")
    assert sum(s.startswith("kvasir-seg/") for s in polyp) == 100
    assert 122 <= sum(s.startswith("cvc-clinicdb/") for s in polyp) <= 150  # whole sequences, >= 20 % of 612
    assert all("." not in s.split("/")[-1] for s in polyp)  # stems, no file extensions
    camvid = packaged_split("camvid")
    assert len(camvid) == 101 and camvid[0] == "0016E5_07959" and camvid[-1] == "0016E5_08159"


@pytest.mark.skipif(not (SHARED / "kvasir-seg").is_dir(), reason="shared data (../shared/data) not present")
def test_regenerating_fixed_splits_gives_the_committed_files() -> None:
    pytest.importorskip("semiseg.data.presets", reason="presets not available")
    from semiseg.data.splits import regenerate_fixed_splits

    result = regenerate_fixed_splits(SHARED)
    assert result["polyp"] == packaged_split("polyp")
    assert result["camvid"] == packaged_split("camvid")
