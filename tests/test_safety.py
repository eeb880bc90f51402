"""Issue 15, one test per class of failure: the tool trusts nothing it reads and explains every failure.

Everything runs in-process on a 0.3M-parameter network and 24x24 images (about two seconds per run).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from semiseg import api
from semiseg.api import load_config
from semiseg.config import ModelConfig
from semiseg.data.inspect import inspect_spec
from semiseg.data.presets import load_source
from semiseg.models.factory import build_model
from tests.safety_helpers import (
    TINY,
    cli,
    copy_run,
    make_folder,
    plant_pickle,
    set_mask_value,
    sets,
    tree,
)


def quiet(*_args: object) -> None:
    pass


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def train(tmp_path, name: str, data, *extra: str):
    cfg = load_config(None, [*TINY, f"data.source={data}", f"name={name}", f"out_dir={tmp_path / 'runs'}", *extra])
    api.run(cfg, log=quiet)
    return tmp_path / "runs" / name


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny supervised run (copied by each test that changes it)."""
    tmp = tmp_path_factory.mktemp("safety")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEMISEG_CACHE", str(tmp / "cache"))
    data = make_folder(tmp / "data", unlabeled=2)
    run = train(tmp, "base", data)
    yield run
    mp.undo()


# -- 1. checkpoints cannot carry code ------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["evaluate", "resume", "predict", "report"])
def test_crafted_pickle_never_runs(finished, tmp_path, capsys, command):
    run = copy_run(finished, tmp_path / "run")
    marker = tmp_path / "PWNED"
    ckpt = run / "stages" / "0-supervised" / "checkpoints" / ("last.pt" if command == "resume" else "best.pt")
    plant_pickle(ckpt, marker)
    if command == "resume":  # the stage is unfinished, so resume loads last.pt
        (run / "stages" / "0-supervised" / "DONE").unlink()
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (20, 20)).save(images / "a.png")
    args = {"evaluate": ["evaluate", run], "resume": ["resume", run],
            "predict": ["predict", run, images, tmp_path / "pred"], "report": ["report", run]}[command]
    res = cli(args, capsys)
    # report still writes its page of numbers, saying (on stderr and in the page) why pictures are missing
    assert res.code == (0 if command == "report" else 2), res.err
    assert "refused" in res.err and str(ckpt) in res.err and "Traceback" not in res.err
    assert not marker.exists()
    if command == "report":
        assert "refused" in (run / "report.html").read_text()


def test_bench_read_back_never_runs_a_crafted_pickle(tmp_path, cache, capsys):
    from semiseg.bench.matrix import run_config

    data = make_folder(tmp_path / "data")
    overrides = [*TINY, f"data.source={data}", "data.options={}", "data.benchmark_gt=false"]
    cfg = run_config("demo", "supervised", {}, 0, tmp_path / "bench", overrides)
    api.run(cfg, log=quiet)
    marker = tmp_path / "PWNED"
    plant_pickle(tmp_path / "bench" / cfg.name / "stages" / "0-supervised" / "checkpoints" / "best.pt", marker)
    res = cli(["bench", "demo", "--methods", "supervised", "--seeds", "0", "--out-dir", tmp_path / "bench",
               "--results", tmp_path / "results", "--markdown", tmp_path / "B.md", *sets(*overrides)], capsys)
    assert "read back" in res.err and res.code == 0 and "refused" in res.err  # numbers recorded, pictures not
    assert not marker.exists()


# -- 2. a run that changed under the tool is refused ----------------------------------------------------------

def test_changed_config_or_data_is_refused_and_named(tmp_path, cache, capsys):
    data = make_folder(tmp_path / "data")
    run = train(tmp_path, "r", data)
    results = (run / "results.json").read_text()
    config = (run / "config.yaml").read_text()
    assert "name: supervised\n  loss: run\n" in config
    (run / "config.yaml").write_text(config.replace("name: supervised\n  loss: run", "name: mean-teacher"))
    for command in ("resume", "evaluate"):
        res = cli([command, run], capsys)
        assert res.code == 2 and "method.name: 'supervised' -> 'mean-teacher'" in res.err, res.err
    assert (run / "results.json").read_text() == results and not (run / "stages" / "1-mean-teacher").exists()
    (run / "config.yaml").write_text(config.replace("threads: 1", "threads: 2"))  # how to run: allowed
    assert cli(["evaluate", run], capsys).code == 0
    # a changed mask: named, refused, accepted on request
    test_stem = (run / "splits" / "test.txt").read_text().split()[0]
    set_mask_value(data / "masks" / f"{test_stem}.png", 1)
    res = cli(["evaluate", run], capsys)
    assert res.code == 2 and f"test: 1 mask(s) changed ({test_stem})" in res.err and "--accept-changed-data" in res.err
    assert cli(["evaluate", run, "--accept-changed-data"], capsys).code == 0
    # a deleted validation image: named, no way around it but restoring it
    val_stem = (run / "splits" / "val.txt").read_text().split()[0]
    (data / "images" / f"{val_stem}.png").unlink()
    (data / "masks" / f"{val_stem}.png").unlink()
    res = cli(["resume", run, "--accept-changed-data"], capsys)
    assert res.code == 2 and f"val: 1 file(s) no longer in the data ({val_stem})" in res.err
    assert "Traceback" not in res.err


# -- 3. divergence stops the stage; NaN weights are never best and never evaluated ------------------------

def test_divergence_is_an_error_and_nan_checkpoints_are_refused(finished, tmp_path, cache, capsys):
    data = make_folder(tmp_path / "data")
    res = cli(["train", *sets(*TINY, f"data.source={data}", "name=nan", f"out_dir={tmp_path / 'runs'}",
                              "train.lr=1e8", "train.optimizer=sgd", "train.lr_schedule=constant")], capsys)
    assert res.code == 2 and "training diverged at step" in res.err and "train.lr" in res.err
    assert "train.grad_clip" in res.err and "train.amp=none" in res.err
    for best in (tmp_path / "runs").rglob("best.pt"):  # whatever was kept holds finite weights only
        assert all(torch.isfinite(v).all() for v in torch.load(best)["net"].values() if v.is_floating_point())
    run = copy_run(finished, tmp_path / "copy")
    best = run / "stages" / "0-supervised" / "checkpoints" / "best.pt"
    state = torch.load(best)
    next(v for v in state["net"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, best)
    res = cli(["evaluate", run], capsys)
    assert res.code == 2 and "non-finite weights" in res.err


# -- 4. the class table comes from every mask ----------------------------------------------------------------

def test_class_table_from_every_mask_and_stray_values_named(tmp_path, cache, capsys):
    data = make_folder(tmp_path / "data", n=40)
    set_mask_value(data / "masks" / "img37.png", 7)  # a mask a sample of 32 of 40 would skip
    assert cli(["data", "inspect", data], capsys).code == 1
    (problem,) = inspect_spec(str(data)).problems
    res = cli(["train", *sets(*TINY, f"data.source={data}", f"out_dir={tmp_path / 'runs'}")], capsys)
    assert res.code == 2 and "Traceback" not in res.err
    for message in (problem, res.err):  # inspect and train say the same
        assert "img37.png" in message and "7 look stray" in message
    assert not (tmp_path / "runs").exists()
    # declared classes: a value outside them in a *test* mask fails before training, naming the file
    set_mask_value(data / "masks" / "img37.png", 2)
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, stems in (("labeled", "img00 img01 img02 img03"), ("val", "img04 img05"), ("test", "img37")):
        (splits / f"{name}.txt").write_text("\n".join(stems.split()) + "\n")
    res = cli(["train", *sets(*TINY, f"data.source={data}", f"out_dir={tmp_path / 'runs'}",
                              "data.options.classes=[bg,polyp]", f"split.files={splits}")], capsys)
    assert res.code == 2 and "img37.png" in res.err and "outside the class table" in res.err
    assert not (tmp_path / "runs" / "run").exists()
    # inspect and train agree on a clean multi-class folder
    set_mask_value(data / "masks" / "img37.png", 2)
    set_mask_value(data / "masks" / "img00.png", 1)
    assert load_source(str(data)).classes.num_classes == 3


# -- 5. validation before anything is written -----------------------------------------------------------------

def test_bad_split_files_leave_nothing_and_a_retry_works(tmp_path, cache, capsys):
    data = make_folder(tmp_path / "data")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "labeled.txt").write_text("img00\nimg01.png\nimg02\nimg03\n")
    (splits / "val.txt").write_text("img04\nimg05\nnope\n")
    (splits / "test.txt").write_text("img06\nimg07\n")
    args = ["train", *sets(*TINY, f"data.source={data}", f"split.files={splits}", "name=s",
                           f"out_dir={tmp_path / 'runs'}")]
    res = cli(args, capsys)
    assert res.code == 2 and "img01.png" in res.err and "without the file extension" in res.err
    assert tree(tmp_path / "runs") == {}
    (splits / "labeled.txt").write_text("img00\nimg01\nimg02\nimg03\n")
    res = cli(args, capsys)
    assert res.code == 2 and "val.txt" in res.err and "'nope'" in res.err
    (splits / "val.txt").write_text("img04\nimg05\n")
    assert cli(args, capsys).code == 0  # the same name: nothing of the failed starts is in the way
    assert (tmp_path / "runs" / "s" / "splits" / "val.txt").read_text().split() == ["img04", "img05"]


# -- 6. every failure one line: Ctrl-C, predict over bad files, --json, model.weights ------------------------

def test_ctrl_c_says_how_to_resume_and_resume_finishes(tmp_path, cache, capsys, monkeypatch):
    from semiseg.engine.trainer import Trainer

    data = make_folder(tmp_path / "data")
    original = Trainer._save

    def interrupt_after_first_checkpoint(self, name, state):
        original(self, name, state)
        if name == "last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", interrupt_after_first_checkpoint)
    res = cli(["train", *sets(*TINY, f"data.source={data}", "name=c", f"out_dir={tmp_path / 'runs'}")], capsys)
    run = tmp_path / "runs" / "c"
    assert res.code == 130 and f"semiseg resume {run}" in res.err and "last.pt" in res.err
    monkeypatch.setattr(Trainer, "_save", original)
    assert cli(["resume", run], capsys).code == 0 and (run / "results.json").is_file()


def test_predict_goes_on_past_bad_files_then_lists_them(finished, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (30, 20), (90, 40, 40)).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.new("RGB", (20, 30)).save(images / "zlast.png")
    res = cli(["predict", finished, images, tmp_path / "out"], capsys)
    assert res.code == 1 and "skipped 1 unreadable image(s): broken.jpg" in res.err
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["good.png", "zlast.png"]


def test_json_path_checked_before_the_work(finished, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    res = cli(["evaluate", finished, "--json", tmp_path / "missing" / "m.json"], capsys)
    assert res.code == 2 and "--json" in res.err and "does not exist" in res.err


def test_model_weights_from_a_run_another_encoder_and_partial(finished, tmp_path):
    cfg = load_config(finished / "config.yaml")
    best = finished / "stages" / "0-supervised" / "checkpoints" / "best.pt"
    model = build_model(cfg.model.model_copy(update={"weights": str(best)}), 2)
    expected = torch.load(best)["net"]
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())  # our own checkpoint loads
    last = finished / "stages" / "0-supervised" / "checkpoints" / "last.pt"
    build_model(cfg.model.model_copy(update={"weights": str(last)}), 2)  # one network: loads too
    other = build_model(ModelConfig(encoder="tu-mobilenetv3_small_075", weights="none",
                                    decoder_channels=[16, 16, 16, 8, 8]), 2)
    torch.save(other.encoder.state_dict(), tmp_path / "other.pt")
    with pytest.raises(Exception, match=r"another shape .*encoder"):
        build_model(cfg.model.model_copy(update={"weights": str(tmp_path / "other.pt")}), 2)
    partial = {k: v for k, v in expected.items() if not k.startswith("segmentation_head.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(Exception, match=r"only partly: 2 of \d+ keys of the model are not in the file "
                                        r"\(segmentation_head"):
        build_model(cfg.model.model_copy(update={"weights": str(tmp_path / "partial.pt")}), 2)


# -- 7. the README's mydata/unlabeled/ layout -----------------------------------------------------------------

def test_documented_unlabeled_folder_is_used(tmp_path, cache):
    data = make_folder(tmp_path / "mydata", unlabeled=3)
    source = load_source(str(data))
    assert [s.stem for s in source.unlabeled] == ["u0", "u1", "u2"]
    run = train(tmp_path, "u", data)
    assert {"u0", "u1", "u2"} <= set((run / "splits" / "unlabeled.txt").read_text().split())
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    assert set(fingerprint["data"]["unlabeled"]) >= {"u0", "u1", "u2"}


def test_disk_full_mid_run_keeps_the_last_checkpoint_resumable(tmp_path):
    """Fill a small tmpfs during training (own mount namespace); the earlier checkpoint must still resume."""
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("cannot create a mount namespace here (needs root or user namespaces) to mount a small tmpfs")
    from pathlib import Path

    script = Path(__file__).with_name("disk_full_script.py")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, str(script), str(mnt),
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "SEMISEG_CACHE": str(tmp_path / "cache"),
                               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["train_code"] == 2 and "no space left on the device" in report["train_err"]
    assert "the previous file is intact" in report["train_err"] and "semiseg resume" in report["train_err"]
    assert "Traceback" not in report["train_err"] and report["resume_code"] == 0 and report["finished"]
