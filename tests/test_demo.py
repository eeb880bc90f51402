"""`semiseg demo --fast` as a user runs it: every row's number comes from its run, and the control is fair."""

import json

import pytest
import yaml

from semiseg.demo import CONTROL_RUN, DEMO_RUNS, SSL_RUN
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
    # the control trains supervised for the teacher's steps plus the student's
    steps = {n: c["train"]["steps"] for n, c in configs.items()}
    assert steps[CONTROL_RUN.name] == 2 * steps["supervised"] == 2 * steps[SSL_RUN.name]
    assert configs[SSL_RUN.name]["method"].get("generation_steps") is None  # = train.steps
    teacher = tmp_path / "demo" / SSL_RUN.name / "stages" / "0-supervised" / "DONE"
    assert "reused_from" in json.loads(teacher.read_text())  # the same teacher as the supervised row
    share = 100 * (dice[SSL_RUN.name] - dice[CONTROL_RUN.name])
    assert f"vs supervised trained for the same steps: {share:+.1f} pts" in " ".join(proc.stdout.split())
