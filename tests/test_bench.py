"""`semiseg bench` end to end on synthetic data: two methods × two split seeds, resume after a kill, merge."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.cli_helpers import TINY, env, semiseg

SETS = [x for s in TINY for x in ("--set", s)]


def bench_args(tmp_path, seeds="0,1"):
    return ["bench", "demo", "--methods", "supervised,oracle", "--seeds", seeds, "--out-dir",
            str(tmp_path / "bench"), "--results", str(tmp_path / "results"), "--markdown",
            str(tmp_path / "BENCHMARKS.md"), *SETS]


@pytest.mark.slow
def test_tiny_bench_two_methods_two_seeds_then_resume_and_merge(tmp_path):
    # a bench killed during its second run ...
    proc = subprocess.Popen([sys.executable, "-m", "semiseg", *bench_args(tmp_path)], env=env(tmp_path),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = tmp_path / "results" / "demo.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(json.loads(results.read_text())["entries"]) >= 1 \
                and (tmp_path / "bench" / "demo-s0-oracle").exists():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "bench finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = json.loads(results.read_text())["entries"]
    assert [(e["method"], e["split_seed"]) for e in first] == [("supervised", 0)]  # partial result kept
    # ... continues where it stopped: the finished run is read back, the killed one resumed
    out = semiseg(bench_args(tmp_path), tmp_path, timeout=600)
    assert "finished earlier, read back" in out.stderr and "resuming" in out.stderr
    entries = json.loads(results.read_text())["entries"]
    assert {(e["method"], e["split_seed"]) for e in entries} == {(m, s) for m in ("supervised", "oracle")
                                                                 for s in (0, 1)}
    by_key = {(e["method"], e["split_seed"]): e for e in entries}
    assert by_key[("supervised", 0)]["test"] == first[0]["test"]  # read back, not re-run
    # the killed invocation left no session record; the one that finished did, with what it executed
    (session,) = json.loads(results.read_text())["sessions"]
    assert (session["executed"], session["read_back"], session["failed"]) == (3, 1, [])
    assert session["seeds"] == [0, 1] and session["command"].startswith("semiseg bench demo")
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| `supervised` | 0,1 |" in md and "| `oracle` | 0,1 |" in md
    # the split seeds really differ
    labeled = [(tmp_path / "bench" / f"demo-s{s}-supervised" / "splits" / "labeled.txt").read_text() for s in (0, 1)]
    assert labeled[0] != labeled[1]
    # tables regenerate from the JSON alone
    (tmp_path / "BENCHMARKS.md").unlink()
    semiseg(["bench", "tables", "--results", str(tmp_path / "results"), "--markdown",
             str(tmp_path / "BENCHMARKS.md")], tmp_path)
    assert (tmp_path / "BENCHMARKS.md").read_text() == md
