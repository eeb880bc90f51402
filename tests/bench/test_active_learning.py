"""benchmarks/active_learning.py: each row saved as it finishes, finished rows never run again, another K refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from semiseg import api
from tests.bench.scripts import load_script


def _row(arm: str, test: float, seed: int = 0) -> dict:
    return {"split_seed": seed, "method": "supervised", "options": [], "arm": arm,
            "added": 0 if arm == "start" else 10, "test": test, "val": test}


@pytest.fixture
def fake_runs(monkeypatch):
    """api.finish and suggest_labels replaced by fakes that record what was run (no training)."""
    import semiseg.report.suggest as suggest

    trained: list[str] = []

    def finish(cfg, **_):
        trained.append(cfg.name)
        score = 0.5 + 0.01 * len(trained)
        return {"test": {"headline": score}, "val": {"dice": score}, "val_metric": "dice"}, None

    def suggest_labels(run, k, *, out_dir, **_):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / suggest.LIST_FILE).write_text("a\n")
        return SimpleNamespace(to_dict=lambda: {"stems": ["a"], "per_subset": {"part-a": 1}})

    monkeypatch.setattr(api, "finish", finish)
    monkeypatch.setattr(suggest, "suggest_labels", suggest_labels)
    return trained


def test_resumes_row_by_row_and_saves_each_row(tmp_path, fake_runs):
    al = load_script("active_learning")
    results = tmp_path / "al.json"
    results.write_text(json.dumps({"protocol": "demo", "k": 10, "rows": [
        _row("start", 0.40), _row("uncertain", 0.50), _row("random-0", 0.45)]}))
    assert al.main(["--protocol", "demo", "--seeds", "0", "--k", "10", "--out-dir", str(tmp_path / "runs"),
                    "--results", str(results)]) == 0
    # the start run is read back (it picks the images); only the three missing arms are trained
    assert fake_runs == ["demo-s0-supervised", "al-s0-random-1-supervised", "al-s0-random-2-supervised",
                         "al-s0-confident-supervised", "al-s0-typical-supervised"]
    rows = json.loads(results.read_text())["rows"]
    assert [r["arm"] for r in rows] == ["start", "uncertain", "random-0", "random-1", "random-2", "confident",
                                        "typical"]
    assert rows[1]["test"] == 0.50 and all(r["commit"] and "active_learning.py" in r["command"] for r in rows[3:])
    assert rows[3]["per_subset"] == {"part-a": 1}  # each arm's row says where its K images come from
    table = results.with_suffix(".md").read_text()
    assert "| supervised | uncertain | 50.0 | 50.0 | +1.000 |" in table  # (0.50 - 0.40) * 100 / 10 per mask

    fake_runs.clear()  # every row there: nothing runs again, not even the start run
    assert al.main(["--protocol", "demo", "--seeds", "0", "--k", "10", "--out-dir", str(tmp_path / "runs"),
                    "--results", str(results)]) == 0
    assert fake_runs == [] and len(json.loads(results.read_text())["rows"]) == 7


def test_refuses_a_results_file_of_another_k(tmp_path, fake_runs):
    results = tmp_path / "al.json"
    results.write_text(json.dumps({"protocol": "demo", "k": 33, "rows": []}))
    with pytest.raises(SystemExit, match="al.json: holds protocol demo with k=33, not demo with k=10"):
        load_script("active_learning").main(["--protocol", "demo", "--seeds", "0", "--k", "10",
                                             "--results", str(results)])
    assert fake_runs == []


def test_the_table_compares_arms_on_the_seeds_every_arm_has():
    al = load_script("active_learning")
    rows = [_row("start", 0.40), _row("start", 0.60, seed=1), _row("uncertain", 0.50), _row("uncertain", 0.90, seed=1),
            _row("random-0", 0.45)]
    table = al.markdown(rows, 10)
    assert "| supervised | uncertain | 50.0 | 90.0 | 50.0 | +1.000 |" in table  # seed 1 shown, not averaged
    assert "| supervised | start (no mask added) | 40.0 | 60.0 | 40.0 | |" in table
    assert "(supervised: 0)" in table


def test_another_method_trains_its_own_start_after_its_arms_and_gains_over_it(tmp_path, fake_runs):
    al = load_script("active_learning")
    results = tmp_path / "al.json"
    common = ["--protocol", "demo", "--seeds", "0", "--k", "10", "--out-dir", str(tmp_path / "runs"),
              "--results", str(results), "--methods", "st++:retrain_scale=2", "--arms", "uncertain"]
    assert al.main(common) == 0
    # the supervised start picks the images; st++'s own start (no mask added) is trained after its arms
    assert fake_runs == ["demo-s0-supervised", "al-s0-uncertain-st++", "demo-s0-st++"]
    rows = json.loads(results.read_text())["rows"]
    assert [(r["method"], r["arm"], r["options"]) for r in rows] == [
        ("supervised", "start", []), ("st++", "uncertain", ["retrain_scale=2"]), ("st++", "start", ["retrain_scale=2"])]
    table = results.with_suffix(".md").read_text()
    # fake scores: supervised start .51, st++ uncertain .52, st++ start .53: the gain is over st++'s start
    assert "| st++ | uncertain | 52.0 | 52.0 | -0.100 |" in table
    assert "| st++ | start (no mask added) | 53.0 | 53.0 | |" in table
    assert "(supervised: 0; st++: 0)" in table
    fake_runs.clear()
    assert al.main(common) == 0 and fake_runs == []  # every row there, st++'s start included


def test_arms_option_runs_only_the_named_arms_and_refuses_an_unknown_one(tmp_path, fake_runs):
    al = load_script("active_learning")
    results = tmp_path / "al.json"
    common = ["--protocol", "demo", "--seeds", "0", "--k", "10", "--out-dir", str(tmp_path / "runs"),
              "--results", str(results)]
    assert al.main([*common, "--arms", "uncertain,confident"]) == 0
    assert fake_runs == ["demo-s0-supervised", "al-s0-uncertain-supervised", "al-s0-confident-supervised"]
    assert [r["arm"] for r in json.loads(results.read_text())["rows"]] == ["start", "uncertain", "confident"]
    fake_runs.clear()
    with pytest.raises(SystemExit, match="--arms: unknown arm.s. randm-0; choose from uncertain"):
        al.main([*common, "--arms", "uncertain,randm-0"])
    assert fake_runs == []
