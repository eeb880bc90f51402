"""What a careful user expects of scores and of commands, end to end through the CLI: an image whose mask is void
everywhere has no score (left out and counted, in test and in validation, named by `data inspect`); `evaluate`
says which split it scored, scores other data without the run's own data folder, and shows its progress whatever
the run's training display was."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from semiseg import api
from semiseg.evaluation.evaluator import evaluate_arrays
from tests.safety_helpers import TINY, cli, copy_run, make_folder, sets

LABELED, VAL, TEST = "img00 img01 img02 img03 img04 img05", "img06 img07", "img08 img09 img10"
VOID_VAL, VOID_TEST = "img07", "img10"


def _void(path) -> None:
    mask = np.array(Image.open(path))
    Image.fromarray(np.full_like(mask, 255)).save(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained through the CLI on data where one validation and one test mask are void everywhere."""
    tmp = tmp_path_factory.mktemp("trust")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEMISEG_CACHE", str(tmp / "cache"))
    data = make_folder(tmp / "data")
    for stem in (VOID_VAL, VOID_TEST):
        _void(data / "masks" / f"{stem}.png")
    for name, stems in (("labeled", LABELED), ("val", VAL), ("test", TEST)):
        (tmp / "splits").mkdir(exist_ok=True)
        (tmp / "splits" / f"{name}.txt").write_text("\n".join(stems.split()) + "\n")
    from semiseg.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", *sets(*TINY, f"data.source={data}", f"split.files={tmp / 'splits'}", "name=r",
                             f"out_dir={tmp / 'runs'}")])
    assert done.value.code == 0
    yield tmp, tmp / "runs" / "r"
    mp.undo()


def test_a_void_only_mask_has_no_score_in_test_or_validation(trained, capsys):
    tmp, run = trained
    results = json.loads((run / "results.json").read_text())
    test = results["test"]
    assert test["n_void_images"] == 1 and test["void_images"] == [VOID_TEST] and test["n_images"] == 2
    # the test Dice is the mean over the two images that have labels: the void one is not a perfect 1.0
    ctx, model = api.load_run(run)
    res = api.evaluate(run, log=lambda *_: None, progress=False)
    assert res["dice"] == pytest.approx(test["dice"])
    from semiseg.evaluation.evaluator import evaluate_source

    scored = evaluate_source(model, ctx.source, ["img08", "img09"], protocol=ctx.config.eval.protocol,
                             size=tuple(ctx.config.data.size))
    assert test["dice"] == pytest.approx(scored.dice)
    # validation (model selection) scores only the labeled validation image
    assert results["void_images"] == {"val": [VOID_VAL], "test": [VOID_TEST]}
    val = ctx.arrays("val")
    keep = [val.index("img06")]
    alone = evaluate_arrays(model, val.images[keep], val.masks[keep], classes=ctx.classes)
    assert results["val"]["dice"] == pytest.approx(alone.dice)
    assert any(VOID_VAL in w and "no score" in w for w in results["warnings"])
    assert any(VOID_TEST in w and "no score" in w for w in results["warnings"])
    log = (run / "stages" / "0-supervised" / "metrics.jsonl").read_text()
    metrics = [json.loads(line) for line in log.splitlines()]
    assert all(m["val/dice"] < 1.0 for m in metrics if "val/dice" in m)


def test_a_split_of_void_only_masks_is_refused_before_a_run_appears(trained, tmp_path, capsys, monkeypatch):
    tmp, _ = trained
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    splits = tmp_path / "splits"
    shutil.copytree(tmp / "splits", splits)
    (splits / "val.txt").write_text(f"{VOID_VAL}\n")
    res = cli(["train", *sets(*TINY, f"data.source={tmp / 'data'}", f"split.files={splits}", "name=v",
                              f"out_dir={tmp_path / 'runs'}")], capsys)
    assert res.code == 2 and "val: every mask is void (255) everywhere" in res.err and f"{VOID_VAL}.png" in res.err
    assert not (tmp_path / "runs" / "v").exists()


def test_data_inspect_names_a_void_only_mask_as_a_problem(trained, capsys):
    tmp, _ = trained
    from semiseg.data.inspect import inspect_spec

    report = inspect_spec(tmp / "data")
    assert report.void_masks == [VOID_VAL, VOID_TEST] and not report.usable
    assert any(p.startswith(str(tmp / "data" / "masks" / f"{VOID_TEST}.png")) and "every pixel is void" in p
               for p in report.problems)
    res = cli(["data", "inspect", str(tmp / "data")], capsys)
    assert res.code == 1 and re.search(r"void-only masks +│ 2  e.g. img07, img10", res.out)


def test_evaluate_names_the_split_it_scored(trained, tmp_path, capsys):
    _, run = trained
    res = cli(["evaluate", run, "--split", "val", "--json", tmp_path / "m.json", "--no-progress"], capsys)
    assert res.code == 0, res.err
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["split"] == "val" and saved["n_void_images"] == 1
    rows = [line for line in res.out.splitlines() if "dice" in line]
    assert rows and all("│ val " in line for line in rows) and "│ test" not in res.out


def test_evaluate_other_data_needs_not_the_runs_own_data_folder(trained, tmp_path, capsys, monkeypatch):
    tmp, run = trained
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    other = make_folder(tmp_path / "other", n=4)
    moved = copy_run(run, tmp_path / "run")
    shutil.move(tmp / "data", tmp_path / "moved-away")  # the run's own data is gone from where it was
    try:
        res = cli(["evaluate", moved, "--data", other, "--json", tmp_path / "m.json", "--no-progress"], capsys)
    finally:
        shutil.move(tmp_path / "moved-away", tmp / "data")
    assert res.code == 0, res.err
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["split"] == "all" and saved["data"] == "other" and saved["n_images"] == 4
    assert "other/all" in res.out


def test_evaluate_shows_progress_whatever_the_runs_training_display(trained, tmp_path, capsys, monkeypatch):
    import semiseg.progress

    tmp, run = trained
    assert "progress: false" in (run / "config.yaml").read_text()  # as the bench writes it
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(semiseg.progress, "FIRST_LINE_S", 0.0)  # every phase counts as long here
    other = make_folder(tmp_path / "other", n=4)
    res = cli(["evaluate", run, "--data", other], capsys)
    assert res.code == 0, res.err
    assert "reading every mask for the class table" in res.err  # the silent phase before predicting
    assert "evaluate all: 4/4 in" in res.err
    quiet = cli(["evaluate", run, "--data", other, "--no-progress"], capsys)
    assert quiet.code == 0 and quiet.err == ""


def test_the_next_command_removes_what_a_killed_checkpoint_writer_left(trained, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    from tests.test_atomic import KILLED_MID_WRITE

    tmp, run = trained
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp / "cache"))
    run = copy_run(run, tmp_path / "run")
    last = run / "stages" / "0-supervised" / "checkpoints" / "last.pt"
    writer = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(last), "kill"], capture_output=True,
                            text=True)
    left = writer.stdout.strip()
    assert writer.returncode == -9 and left and (last.parent / left.rsplit("/", 1)[-1]).is_file()
    res = cli(["evaluate", run, "--no-progress"], capsys)
    assert res.code == 0, res.err
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]
    assert f"removed {left}, left by a writer that was killed" in res.err
