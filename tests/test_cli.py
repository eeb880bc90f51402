"""The front door, as a user runs it: train, evaluate, predict, methods, resume after SIGKILL, bad input."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from tests.cli_helpers import env, semiseg, train_args


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    semiseg(train_args("sup", tmp / "runs"), tmp)
    return tmp, tmp / "runs" / "sup"


def test_train_writes_run_directory(finished_run):
    _, run = finished_run
    for rel in ("config.yaml", "splits/labeled.txt", "splits/test.txt", "stages/0-supervised/DONE",
                "stages/0-supervised/checkpoints/last.pt", "stages/0-supervised/checkpoints/best.pt",
                "stages/0-supervised/metrics.jsonl", "results.json"):
        assert (run / rel).exists(), rel
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "supervised" and results["val_metric"] == "dice"
    assert 0.0 <= results["test"]["dice"] <= 1.0 and results["test"]["n_images"] > 0
    assert results["peak_rss_mb"] > 0 and results["stage_seconds"] > 0 and results["stage_seconds_all_sessions"]
    # the split files partition the data: nothing from test is in labeled/val
    split = {k: set((run / "splits" / f"{k}.txt").read_text().split()) for k in ("labeled", "val", "test")}
    assert not (split["test"] & (split["labeled"] | split["val"]))


def test_evaluate_and_predict(finished_run, tmp_path):
    tmp, run = finished_run
    out = tmp_path / "metrics.json"
    semiseg(["evaluate", str(run), "--split", "test", "--protocol", "sliding_window", "--window", "64,64",
             "--json", str(out)], tmp)
    assert 0.0 <= json.loads(out.read_text())["dice"] <= 1.0
    images = tmp_path / "imgs"
    images.mkdir()
    for i, name in enumerate(["a b.png", "ü.jpg"]):
        Image.new("RGB", (70 + 10 * i, 50), (120, 60, 50)).save(images / name)
    semiseg(["predict", str(run), str(images), str(tmp_path / "pred")], tmp)
    mask = Image.open(tmp_path / "pred" / "masks" / "a b.png")
    assert mask.size == (70, 50) and mask.mode == "P"
    assert (tmp_path / "pred" / "overlays" / "ü.jpg").exists()


def test_methods_lists_options(tmp_path):
    proc = semiseg(["methods"], tmp_path)
    assert "supervised" in proc.stdout and "oracle" in proc.stdout
    assert "fixmatch" in proc.stdout and "unimatch" in proc.stdout and "fp_dropout = 0.5" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["--set", "train.lrr=1"], "train.lrr: unknown key"),
    (["--set", "train.steps=0"], "train.steps"),
    (["--set", "method.name=nope"], "unknown method 'nope'"),
    (["--set", "data.source=/definitely/not/here"], "/definitely/not/here"),
    # an option the rest of the config cannot support fails before the run directory exists
    (["--set", "method.name=momentum-pl", "--set", "data.size=[64,96]"], "method.augment=polyp"),
    (["--set", "method.name=st++", "--set", "train.steps=2"], "method.checkpoints=3 needs train.steps >= 3"),
    (["--set", "data.source=.", "--set", "data.options.kind=binary"], "data.options must hold folder options"),
])
def test_bad_input_clear_error_nonzero_exit(tmp_path, args, needle):
    proc = semiseg(["train", *args, "--set", f"out_dir={tmp_path / 'runs'}"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "run").exists()  # nothing half-written


def test_existing_run_is_not_overwritten(finished_run):
    tmp, run = finished_run
    proc = semiseg(train_args("sup", run.parent), tmp, check=False)
    assert proc.returncode == 2 and "semiseg resume" in proc.stderr


def _weights(path):
    return torch.load(path, weights_only=False)["nets"]["model"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    extra = ["train.deterministic=true", "train.steps=24", "train.checkpoint_every=4", "train.eval_every=8"]
    semiseg(train_args("straight", tmp_path / "runs", extra), tmp_path)
    cmd = [sys.executable, "-m", "semiseg", *train_args("killed", tmp_path / "runs", extra)]
    proc = subprocess.Popen(cmd, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "killed" / "stages" / "0-supervised" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    metrics = last.parent.parent / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        # the metrics log is cheap to poll (loading a checkpoint under load took long enough to miss the window)
        if last.exists() and metrics.exists() and '"step": 8' in metrics.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "killed" / "results.json").exists()
    semiseg(["resume", str(tmp_path / "runs" / "killed")], tmp_path)
    a = _weights(tmp_path / "runs" / "straight" / "stages" / "0-supervised" / "checkpoints" / "last.pt")
    b = _weights(last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(name):
        lines = (tmp_path / "runs" / name / "stages" / "0-supervised" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    assert log("straight") == log("killed")
    ra = json.loads((tmp_path / "runs" / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "runs" / "killed" / "results.json").read_text())
    assert ra["test"]["dice"] == rb["test"]["dice"] and ra["val"] == rb["val"]


def test_unknown_option_is_a_usage_error_not_a_traceback(tmp_path):
    # typer >= 0.2x raises its vendored click's exceptions: they must still end in click's usage message
    proc = semiseg(["train", "--out-dir", "x"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "No such option: --out-dir" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
