"""suggest-labels: the uncertainty score and the diversity rule against hand values, and a tiny run end to end
(the list, the contact sheet, the control strategies, the errors a user can make)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semiseg.report.suggest import (
    least_confidence,
    mean_rank,
    proportional_quotas,
    select_diverse,
    select_stratified,
    thumbnail,
)
from tests.safety_helpers import TINY, cli


def test_least_confidence_by_hand():
    certain = np.zeros((2, 2, 2), np.float32)
    certain[0] = 1.0
    assert least_confidence(certain) == 0.0
    half = np.full((2, 2, 2), 0.5, np.float32)  # the most unsure a binary pixel can be
    assert least_confidence(half) == pytest.approx(0.5)
    mixed = np.stack([np.array([[0.9, 0.6], [1.0, 0.5]]), np.array([[0.1, 0.4], [0.0, 0.5]])]).astype(np.float32)
    assert least_confidence(mixed) == pytest.approx(1 - (0.9 + 0.6 + 1.0 + 0.5) / 4)


def test_thumbnails_of_near_duplicates_are_alike_and_of_other_images_not():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    noisy = np.clip(frame.astype(int) + rng.integers(-6, 7, frame.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    a, b, c = thumbnail(frame), thumbnail(noisy), thumbnail(other)
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert float(a @ b) > 0.95 > float(a @ c)


def test_the_diversity_rule_skips_near_duplicates_and_fills_up_when_it_must():
    features = np.eye(4, dtype=np.float32)
    features[1] = features[0]  # image 1 duplicates image 0
    assert select_diverse([0, 1, 2, 3], features, 3, 0.95) == ([0, 2, 3], 1)
    assert select_diverse([0, 1, 2, 3], features, 3, 1.0) == ([0, 1, 2], 0)  # similarity 1 keeps duplicates
    assert select_diverse([0, 1], features, 2, 0.95) == ([0, 1], 1)  # too few distinct ones: the skipped fill up


def test_one_frame_per_video_is_taken_before_a_second_from_any_video():
    features = np.eye(5, dtype=np.float32)  # all distinct: only the group rule acts
    groups = ["v1", "v1", "v2", None, "v2"]
    assert select_diverse([0, 1, 2, 3, 4], features, 3, 0.95, groups) == ([0, 2, 3], 0)
    # fewer videos than asked: the waiting frames fill up, best first
    assert select_diverse([0, 1, 2, 4], features, 3, 0.95, groups) == ([0, 2, 1], 0)


def test_quotas_are_proportional_with_the_largest_remainder():
    assert proportional_quotas(["a"] * 60 + ["b"] * 40, 33) == {"a": 20, "b": 13}  # 19.8 -> 20, 13.2 -> 13
    assert proportional_quotas(["a"] * 5 + ["b"] * 5, 3) == {"a": 2, "b": 1}  # a tie goes to the first by name
    assert proportional_quotas(["a"] * 9 + ["b"], 4) == {"a": 4, "b": 0}
    assert sum(proportional_quotas(["a", "b", "c"] * 7, 10).values()) == 10


def test_stratified_selection_keeps_each_source_at_its_share_and_the_ranking_order():
    features = np.eye(10, dtype=np.float32)
    strata = ["k"] * 6 + ["c"] * 4
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # every "k" image ranks above every "c" one
    chosen, skipped = select_stratified(order, features, 5, 0.95, strata, [None] * 10)
    assert chosen == [0, 1, 2, 6, 7] and skipped == 0  # 3 of 6 "k", 2 of 4 "c" (unstratified: 0..4, all "k")


def test_mean_rank_combines_scales_and_ranks_nan_last():
    a = np.array([0.9, 0.1, 0.5])
    b = np.array([10.0, 30.0, np.nan])
    assert mean_rank(a, b).tolist() == [0.5, 1.0, 1.5]  # ranks a: 0, 2, 1; b: 1, 0, 2 (NaN last)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("suggest")
    from semiseg import api

    cfg = api.load_config(None, [*TINY, f"out_dir={tmp / 'runs'}", "name=sup", f"data.cache_dir={tmp / 'cache'}",
                                 "data.options.n=30"])
    api.run(cfg, log=lambda *_: None)
    return tmp / "runs" / "sup"


def test_suggest_labels_writes_the_k_least_confident_distinct_unlabeled_images(tiny_run, capsys, tmp_path):
    res = cli(["suggest-labels", tiny_run, "--n", "3", "--json", tmp_path / "s.json", "--no-progress"], capsys)
    assert res.code == 0, res.err
    assert "wrote 3 images to label" in res.out
    doc = json.loads((tmp_path / "s.json").read_text())
    unlabeled = (tiny_run / "splits" / "unlabeled.txt").read_text().split()
    listed = (tiny_run / "labels-to-add.txt").read_text().split()
    assert listed == doc["stems"] and len(set(listed)) == 3 and set(listed) <= set(unlabeled)
    assert doc["scores"] == sorted(doc["scores"], reverse=True)  # best (least confident) first
    sheet = (tiny_run / "labels-to-add.html").read_text()
    assert sheet.count("<figure>") == 3 and all(s in sheet for s in listed) and "least confidence" in sheet
    # the control arms: the confident end scores lower; a random draw is seeded
    out = tmp_path / "confident"
    res = cli(["suggest-labels", tiny_run, "--n", "3", "--strategy", "confident", "--out", out, "--json",
               tmp_path / "c.json", "--no-progress"], capsys)
    assert res.code == 0, res.err
    confident = json.loads((tmp_path / "c.json").read_text())
    assert max(confident["scores"]) <= min(doc["scores"]) and (out / "labels-to-add.txt").is_file()
    draws = []
    for i, s in enumerate((0, 0, 1)):
        cli(["suggest-labels", tiny_run, "--n", "3", "--strategy", "random", "--seed", str(s), "--out",
             tmp_path / f"r{i}", "--no-progress"], capsys)
        draws.append((tmp_path / f"r{i}" / "labels-to-add.txt").read_text().split())
    assert draws[0] == draws[1] != draws[2]
    # the low-budget criterion: typical images of uncovered clusters, seeded
    typical = []
    for i in range(2):
        res = cli(["suggest-labels", tiny_run, "--n", "3", "--strategy", "typical", "--out", tmp_path / f"t{i}",
                   "--no-progress"], capsys)
        assert res.code == 0, res.err
        assert "TypiClust" in res.out
        typical.append((tmp_path / f"t{i}" / "labels-to-add.txt").read_text().split())
    assert typical[0] == typical[1] and len(set(typical[0])) == 3 and set(typical[0]) <= set(unlabeled)


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "--n 0: ask for at least one image"),
    (["--n", "999"], "--n 999: the run has only"),
    (["--n", "2", "--strategy", "smart"], "--strategy 'smart'"),
    (["--n", "2", "--similarity", "0"], "--similarity 0.0"),
])
def test_bad_requests_are_one_line_errors(tiny_run, capsys, args, message):
    res = cli(["suggest-labels", tiny_run, *args, "--no-progress"], capsys)
    assert res.code != 0 and message in res.err and "Traceback" not in res.err


def test_an_unfinished_run_is_refused(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    res = cli(["suggest-labels", tmp_path / "half", "--n", "2"], capsys)
    assert res.code != 0 and "no finished run here" in res.err


def test_the_suggested_images_join_the_labeled_split_of_a_new_run(tiny_run, tmp_path):
    from semiseg import api
    from semiseg.errors import ConfigError

    listed = tmp_path / "add.txt"
    unlabeled = (tiny_run / "splits" / "unlabeled.txt").read_text().split()
    listed.write_text("\n".join(unlabeled[:2]) + "\n")
    base = [*TINY, f"out_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "data.options.n=30"]
    ctx = api.prepare(api.load_config(None, [*base, "name=more", f"split.add_labeled={listed}"]),
                      tmp_path / "runs" / "more", fresh=True, log=lambda *_: None)
    before = (tiny_run / "splits" / "labeled.txt").read_text().split()
    assert ctx.splits.labeled == [*before, *unlabeled[:2]] and ctx.splits.unlabeled == unlabeled[2:]
    assert ctx.splits.val == (tiny_run / "splits" / "val.txt").read_text().split()  # the rest of the split kept
    listed.write_text(before[0] + "\n")  # a labeled image is no unlabeled one to add
    with pytest.raises(ConfigError, match=r"split.add_labeled=.*1 stem\(s\) are not unlabeled images"):
        api.prepare(api.load_config(None, [*base, "name=wrong", f"split.add_labeled={listed}"]),
                    tmp_path / "runs" / "wrong", fresh=True, log=lambda *_: None)
