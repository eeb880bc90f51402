"""`semiseg demo --fast` as a user runs it: every row's number comes from its run, and the control is fair."""

import json

import pytest
import yaml

from semiseg.demo import DEMO_RUNS, SSL_RUNS
from tests.cli_helpers import semiseg


@pytest.mark.slow
def test_fast_demo_prints_what_its_runs_measured(tmp_path):
    proc = semiseg(["demo", "--fast", "--out-dir", str(tmp_path / "demo")], tmp_path, timeout=600)
    cells = {}
    for line in proc.stdout.splitlines():
        parts = [p.strip() for p in line.split("│") if p.strip()]
        if len(parts) >= 3 and parts[0] in {r.name for r in DEMO_RUNS}:
            cells[parts[0]] = parts
    assert set(cells) == {r.name for r in DEMO_RUNS}, proc.stdout
    dice, configs = {}, {}
    for run in DEMO_RUNS:
        name, run_dir = run.name, tmp_path / "demo" / run.dir_name
        dice[name] = json.loads((run_dir / "results.json").read_text())["test"]["dice"]
        configs[name] = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cells[name][1] == f"{dice[name]:.3f}"
        if name != "supervised":
            assert cells[name][2] == f"{100 * (dice[name] - dice['supervised']):+.1f} pts"
    # each semi-supervised run is set against supervised trained for its own steps
    steps = {n: c["train"]["steps"] for n, c in configs.items()}
    results = {r.name: json.loads((tmp_path / "demo" / r.dir_name / "results.json").read_text()) for r in DEMO_RUNS}
    assert results["mean-teacher"]["trained_steps"] == steps["supervised"]
    assert results["self-learning"]["trained_steps"] == steps["supervised 2x"] == 2 * steps["supervised"]
    teacher = tmp_path / "demo" / "self-learning" / "stages" / "0-supervised" / "DONE"
    assert "reused_from" in json.loads(teacher.read_text())  # the same teacher as the supervised row
    text = " ".join(proc.stdout.split())
    for run, control in (("mean-teacher", "supervised"), ("self-learning", "supervised 2x")):
        share = 100 * (dice[run] - dice[control])
        assert cells[run][3] == f"{share:+.1f} pts"
        assert f"did for {run}: vs supervised trained for the same steps ({results[run]['trained_steps']}): " \
               f"{share:+.1f} pts" in text
    assert {r.name for r in SSL_RUNS} == {"mean-teacher", "self-learning"}
