"""A stage's recorded time counts every session that worked on it: a stage killed and resumed reports both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from semiseg.layout import RunLayout
from semiseg.pipeline.stages import Stage, run_stages, stage_clock

# the first session sleeps until it is killed; the second finishes after a short nap
SLOW_STAGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import semiseg.pipeline.stages as stages

    stages.CLOCK_EVERY = 0.05

    def run(path):
        first = not (path / "started").exists()
        (path / "started").write_text("x")
        time.sleep(60 if first else 0.3)

    stages.run_stages(Path(sys.argv[1]), [stages.Stage("slow", run)], log=print)
""")


def _recorded(file: Path) -> float:
    try:
        return json.loads(file.read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return 0.0


def test_a_stage_killed_and_resumed_reports_the_time_of_both_sessions(tmp_path):
    run_dir = tmp_path / "run"
    stage = RunLayout(run_dir).stage(0, "slow")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STAGE, str(run_dir)], env=env)
    try:
        deadline = time.monotonic() + 60
        while _recorded(stage.elapsed) < 1.0:  # the clock's record of the running stage grows
            assert proc.poll() is None and time.monotonic() < deadline, "the stage never recorded its time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    killed_session = _recorded(stage.elapsed)
    assert killed_session >= 1.0 and not stage.is_done()

    (path,) = run_stages(run_dir, [Stage("slow", lambda p: time.sleep(0.3))], log=lambda *_: None)
    seconds = json.loads(stage.done.read_text())["seconds"]
    assert seconds >= killed_session + 0.3  # both sessions, not the last one alone
    assert seconds < killed_session + 30


def test_a_failed_session_counts_to_its_last_beat_and_the_next_session_adds_to_it(tmp_path):
    with pytest.raises(RuntimeError), stage_clock(tmp_path, every=0.05):
        time.sleep(0.3)
        raise RuntimeError("the stage failed")
    first = _recorded(tmp_path / "elapsed.json")
    assert first >= 0.1  # the beats of the failed session count, as a killed one's
    with stage_clock(tmp_path, every=3600) as seconds:
        assert seconds() >= first
        time.sleep(0.1)
    assert _recorded(tmp_path / "elapsed.json") >= first + 0.09  # recorded at the end (rounded to 0.01 s)


def test_a_session_failing_before_its_first_beat_leaves_the_record_as_it_was(tmp_path):
    (tmp_path / "elapsed.json").write_text('{"seconds": 5.0}')
    with pytest.raises(ValueError), stage_clock(tmp_path, every=3600):
        raise ValueError("a bad checkpoint, found at once")
    assert (tmp_path / "elapsed.json").read_text() == '{"seconds": 5.0}'
