"""Processes sharing an output folder: one trains a run, a shared teacher is computed once, a bench skips or
defers what another process is doing, and a killed holder leaves nothing locked."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from semiseg.errors import RunBusyError, StageBusyError
from semiseg.layout import RunLayout
from semiseg.locks import exclusive, run_lock_path
from semiseg.pipeline.stages import Stage, key_hash, run_stages
from tests.cli_helpers import TINY, env, semiseg

HOLD = """
import sys
from pathlib import Path
from semiseg.locks import exclusive
with exclusive(Path(sys.argv[1]), what="x"):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock at a path until told to stop (or killed)."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env(tmp_path))
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_held_lock_names_its_holder_and_a_killed_holder_frees_it(tmp_path, holder):
    path = tmp_path / "locks" / "r.lock"
    proc = holder(path)
    with pytest.raises(RunBusyError, match=rf"run r is in use by pid {proc.pid} on .* since"):
        with exclusive(path, what="run r"):
            pass
    proc.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
    proc.wait()
    with exclusive(path, what="run r"):
        assert f"pid {os.getpid()} " in path.read_text()


def test_waiting_blocks_until_the_holder_is_done(tmp_path, holder):
    path = tmp_path / "s.lock"
    proc = holder(path)
    waited = []

    def release_once_waiting(holder_text):  # called when the lock was found busy, before blocking on it
        waited.append(holder_text)
        proc.stdin.write("\n")
        proc.stdin.flush()

    with exclusive(path, what="stage", wait=True, on_wait=release_once_waiting):
        assert f"pid {os.getpid()} " in path.read_text()
    assert len(waited) == 1 and waited[0].startswith(f"pid {proc.pid} on ")
    assert proc.wait(timeout=30) == 0


def test_a_discarded_lock_file_is_not_what_a_waiter_ends_up_holding(tmp_path):
    path, held, waiting = tmp_path / "locks" / "r.lock", threading.Event(), threading.Event()

    def first():
        with exclusive(path, what="r", discard=lambda: True):
            held.set()
            waiting.wait(timeout=30)  # the waiter has opened the file this holder now removes

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with exclusive(path, what="r", wait=True, on_wait=lambda _: waiting.set()):  # must re-open the new file
        assert waiting.is_set() and path.is_file() and f"pid {os.getpid()} " in path.read_text()
        with pytest.raises(RunBusyError):  # and it really is the lock others see
            with exclusive(path, what="r"):
                pass
    thread.join()


def _finished_stage(out_dir, run, key):
    """What another process leaves when it finishes a stage: the stage with DONE and its index entry."""
    path = RunLayout(out_dir / run).stage(0, "teacher").path
    path.mkdir(parents=True)
    (path / "weights.pt").write_text("w")
    (path / "DONE").write_text(json.dumps({"stage": "teacher"}))
    (out_dir / ".stage-index" / key_hash(key)).write_text(f"{run}/stages/0-teacher")


def test_a_shared_stage_another_process_computes_is_waited_for_then_reused(tmp_path):
    key, calls, messages = {"teacher": 1}, [], []
    lock = tmp_path / ".stage-index" / f"{key_hash(key)}.lock"
    held, waiting, done = threading.Event(), threading.Event(), threading.Event()

    def other_process():  # flock locks belong to an open file: a second open conflicts even in one process
        with exclusive(lock, what="x"):
            held.set()
            waiting.wait(timeout=30)
            _finished_stage(tmp_path, "other", key)
        done.set()

    def log(message):
        messages.append(message)
        if "waiting to reuse it" in message:
            waiting.set()

    thread = threading.Thread(target=other_process)
    thread.start()
    held.wait()
    stage = Stage("teacher", run=calls.append, key=key)
    with pytest.raises(StageBusyError, match="the shared stage 0-teacher is in use by pid"):
        run_stages(tmp_path / "mine", [stage], wait_for_shared=False, log=log)
    assert not RunLayout(tmp_path / "mine").stage(0, "teacher").path.exists()  # nothing started
    (path,) = run_stages(tmp_path / "mine", [stage], log=log)
    thread.join()
    assert waiting.is_set() and done.is_set() and calls == []  # computed once, by the other process
    assert json.loads((path / "DONE").read_text())["reused_from"].endswith("0-teacher")
    assert (path / "weights.pt").read_text() == "w"


def test_an_unshared_stage_takes_no_lock(tmp_path):
    calls = []
    run_stages(tmp_path / "r", [Stage("own", run=calls.append, key=None)], wait_for_shared=False)
    assert len(calls) == 1 and not (tmp_path / ".stage-index").exists()


def test_resume_of_a_run_another_process_trains_exits_75_and_touches_nothing(tmp_path, holder):
    from semiseg.api import load_config
    from semiseg.config import dump_config

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(load_config("demo")))
    proc = holder(run_lock_path(run_dir))
    out = semiseg(["resume", str(run_dir)], tmp_path, check=False)
    assert out.returncode == 75, out.stderr
    assert f"is in use by pid {proc.pid}" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_one_run_has_one_lock_whatever_path_names_it(tmp_path):
    """A real training process holds its run; `resume` through a symlink to the run, or to its out_dir, meets
    the same lock (it used to take `.locks/link.lock` and train the same stage twice at once)."""
    runs = tmp_path / "runs"
    args = [*TINY, "train.steps=100000", "train.eval_every=100000", "train.checkpoint_every=100000", "name=r",
            f"out_dir={runs}"]
    trainer = subprocess.Popen([sys.executable, "-m", "semiseg", "train", *[x for s in args for x in ("--set", s)]],
                               env=env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 240
        while not (runs / "r" / "stages").is_dir():  # past preflight: the run exists and trains
            assert trainer.poll() is None, trainer.stderr.read()
            assert time.monotonic() < deadline, "the training process did not start"
            time.sleep(0.5)
        (tmp_path / "link").symlink_to(runs / "r")
        (tmp_path / "runs-link").symlink_to(runs)
        for path in ("link", "runs-link/r"):
            out = semiseg(["resume", path], tmp_path, check=False)
            assert out.returncode == 75, out.stderr
            assert f"is in use by pid {trainer.pid}" in out.stderr and "Traceback" not in out.stderr
        assert not (tmp_path / ".locks").exists() and not (tmp_path / "runs-link" / ".locks" / "link.lock").exists()
    finally:
        trainer.kill()
        trainer.wait()


def _fake_bench(tmp_path, monkeypatch, behaviour):
    from semiseg import api
    from semiseg.bench.matrix import run_bench
    from semiseg.bench.tables import load_entries, load_sessions

    calls = []

    def fake_finish(cfg, wait_for_shared=True, **_):
        calls.append((cfg.name, wait_for_shared))
        executed = behaviour(cfg.name, wait_for_shared) is not False
        return {"method": cfg.method.name, "split_seed": cfg.split.seed, "val_metric": "dice",
                "test": {"headline": 0.5}, "name": cfg.name}, executed

    monkeypatch.setattr(api, "finish", fake_finish)
    results = tmp_path / "r" / "demo.json"
    run_bench("demo", methods=["oracle", "supervised"], seeds=[0], out_dir=tmp_path / "b", results_path=results,
              log=lambda *_: None)
    return calls, load_entries(results), load_sessions(results)


def test_a_bench_trains_other_runs_while_a_shared_teacher_is_busy_and_waits_only_at_the_end(tmp_path, monkeypatch):
    def behaviour(name, wait):
        if name == "demo-s0-oracle" and not wait:
            raise StageBusyError("the shared stage 0-supervised is in use by pid 1")

    calls, entries, (session,) = _fake_bench(tmp_path, monkeypatch, behaviour)
    assert calls == [("demo-s0-oracle", False), ("demo-s0-supervised", False), ("demo-s0-oracle", True)]
    assert {e["method"] for e in entries} == {"oracle", "supervised"}
    assert (session["executed"], session["failed"], session["busy"]) == (2, [], [])


def test_a_bench_skips_a_run_another_process_trains_and_does_not_fail(tmp_path, monkeypatch):
    def behaviour(name, wait):
        if name == "demo-s0-supervised":
            raise RunBusyError("run demo-s0-supervised is in use by pid 1")

    calls, entries, (session,) = _fake_bench(tmp_path, monkeypatch, behaviour)
    assert [e["method"] for e in entries] == ["oracle"]  # the other process records its own run
    assert (session["executed"], session["failed"], session["busy"]) == (1, [], ["demo-s0-supervised"])
    from semiseg.bench.tables import sessions_table

    assert "| 0 | 2 | 1 / 0 / 1 / 0 |" in "\n".join(sessions_table([session]))  # the skipped run is shown


def test_a_run_another_worker_finished_after_the_check_is_read_back_not_evaluated_again(tmp_path, monkeypatch):
    def behaviour(name, wait):
        return name != "demo-s0-supervised"  # api.finish found its results.json under the lock

    calls, entries, (session,) = _fake_bench(tmp_path, monkeypatch, behaviour)
    assert {e["method"] for e in entries} == {"oracle", "supervised"}
    assert (session["executed"], session["read_back"]) == (1, 1)


def test_finish_reads_a_finished_run_back_under_its_lock_and_refuses_a_busy_one(tmp_path, holder):
    from semiseg import api
    from semiseg.api import load_config

    cfg = load_config("demo", [f"out_dir={tmp_path / 'runs'}", "name=r"])
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"test": {"headline": 0.5}}))
    before = sorted(p.name for p in run_dir.iterdir())
    assert api.finish(cfg, log=lambda *_: None) == ({"test": {"headline": 0.5}}, False)  # no training, no test
    assert sorted(p.name for p in run_dir.iterdir()) == before
    proc = holder(run_lock_path(run_dir))
    with pytest.raises(RunBusyError, match=f"in use by pid {proc.pid}"):
        api.finish(cfg, log=lambda *_: None)


def test_ctrl_c_stops_the_bench_instead_of_going_on_with_the_next_run(tmp_path, monkeypatch):
    from semiseg.errors import RunInterrupted

    def behaviour(name, wait):
        raise RunInterrupted("interrupted: `semiseg resume ...` continues")

    with pytest.raises(RunInterrupted):
        _fake_bench(tmp_path, monkeypatch, behaviour)
    assert not (tmp_path / "r" / "demo.json").exists()  # no run recorded, no session: the bench did not finish


@pytest.mark.slow
def test_bench_workers_side_by_side_train_every_run_exactly_once(tmp_path):
    args = ["bench", "demo", "--workers", "2", "--methods", "supervised,oracle", "--seeds", "0,1", "--out-dir",
            str(tmp_path / "bench"), "--results", str(tmp_path / "results"), "--markdown",
            str(tmp_path / "BENCHMARKS.md"), *[x for s in TINY for x in ("--set", s)]]
    out = semiseg(args, tmp_path, timeout=600)
    data = json.loads((tmp_path / "results" / "demo.json").read_text())
    assert len(data["entries"]) == 4 and len(data["sessions"]) == 2  # one session per worker
    assert sum(s["executed"] for s in data["sessions"]) == 4  # no run trained by both
    assert all(s["command"].endswith("--set train.threads=1") for s in data["sessions"])
    assert "[worker 1] " in out.stderr and "[worker 2] " in out.stderr
    assert "| `supervised` | 0,1 |" in (tmp_path / "BENCHMARKS.md").read_text()


def test_a_failing_worker_fails_the_bench(tmp_path):
    out = semiseg(["bench", "demo", "--workers", "2", "--methods", "nosuch", "--out-dir", str(tmp_path / "b"),
                   "--results", str(tmp_path / "r")], tmp_path, check=False)
    assert out.returncode == 2 and out.stderr.count("no bench options for ['nosuch']") == 2
