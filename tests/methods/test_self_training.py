"""The labelling stage, ST++'s stability split, the pseudo-labeled training set, ST / ST++ resume and reuse."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.api import config_from_dict
from semiseg.data.cache import CachedArrays
from semiseg.data.classes import ClassTable
from semiseg.data.sources import folder_source
from semiseg.data.splits import Splits, make_splits
from semiseg.data.synthetic import generate_synthetic, synthetic_classes
from semiseg.data.transforms import to_input
from semiseg.data.types import DataSource
from semiseg.engine.checkpoint import load_checkpoint, seed_everything
from semiseg.errors import DataError
from semiseg.methods import st_stability
from semiseg.methods.registry import Method, get_method
from semiseg.methods.st_stability import add_stability, snapshot_steps
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.labeling import ROUND, load_round, oversampled_size, pseudo_dataset
from semiseg.pipeline.plan import Pipeline, StageRef
from semiseg.pipeline.stages import run_stages
from semiseg.pseudo.policies import ClassBalanced, SelectAll

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- helpers
def fake_run(tmp: Path, unlabeled: np.ndarray, *, gt: np.ndarray | None = None, labeled: np.ndarray | None = None,
             labeled_masks: np.ndarray | None = None, batch: int = 2) -> RunContext:
    """A run over in-memory arrays (no files): unlabeled stems ``u0..``, labeled ``l0..``."""
    n, h, w = unlabeled.shape[:3]
    cfg = config_from_dict({"data": {"size": [h, w], "benchmark_gt": gt is not None},
                            "train": {"batch_size": batch, "progress": False,
                                      "augment": {"scale": [1.0, 1.0], "hflip": False}}})
    source = DataSource("fake", None, ClassTable.binary("obj"), [], lambda p: None)
    stems = [f"u{i}" for i in range(n)]
    lab_stems = [f"l{i}" for i in range(0 if labeled is None else len(labeled))]
    run = RunContext(cfg, tmp / "run", source, Splits(labeled=lab_stems, unlabeled=stems), torch.device("cpu"))
    run._arrays["unlabeled"] = CachedArrays(unlabeled, None, stems, [(h, w)] * n, [False] * n, tmp)
    if gt is not None:
        run._arrays["unlabeled_gt"] = CachedArrays(unlabeled, gt, stems, [(h, w)] * n, [True] * n, tmp)
    if labeled is not None:
        run._arrays["labeled"] = CachedArrays(labeled, labeled_masks, lab_stems, [(h, w)] * len(labeled),
                                              [True] * len(labeled), tmp)
    return run


def pixel_net() -> nn.Module:
    """A per-pixel network (1×1 convs): exactly equivariant to flips, whatever the padding."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net.eval()


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class FixedNet:
    """A teacher that is not a stage (a net built by the test): a label stage taking it is never reused."""

    key_hash = None

    def __init__(self, net: Callable[[], nn.Module] | nn.Module) -> None:
        self.net = net

    @property
    def refs(self) -> list[FixedNet]:
        return [self]

    def resolve(self) -> FixedNet:
        return self

    def model(self, net: str | None = None, which: str = "best") -> nn.Module:
        return self.net() if not isinstance(self.net, nn.Module) else self.net

    def checkpoint(self, net: str | None = None, which: str = "best") -> None:
        return None


def label(run: RunContext, name: str, net: Callable[[], nn.Module] | nn.Module, **kw) -> Pipeline:  # noqa: ANN003
    """A pipeline of one label stage of ``net`` over ``kw.stems`` (default: every unlabeled image)."""
    p = Pipeline(run)
    p.label(name, teacher=FixedNet(net), stems=kw.pop("stems", list(run.splits.unlabeled)),
            policy=kw.pop("policy", SelectAll()), **kw)
    return p


class TableNet(nn.Module):
    """Predicts a fixed label map per image; the image's id is its (uniform) pixel value / 10."""

    def __init__(self, maps: list[np.ndarray]) -> None:
        super().__init__()
        self.maps = [torch.as_tensor(m, dtype=torch.long) for m in maps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x * 255)[:, 0, 0, 0].round().long() // 10  # toy nets see to_input's [0, 1] images
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        for b, i in enumerate(ids.tolist()):
            m = self.maps[i]
            out[b, :, : m.shape[0], : m.shape[1]] = torch.nn.functional.one_hot(m, 2).permute(2, 0, 1) * 10.0
        return out


# ------------------------------------------------------------------------------------------ stability
def test_stability_stage_scores_and_split_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    z, o = np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8)
    half = np.zeros((4, 4), np.uint8)
    half[:, :2] = 1
    one_off = half.copy()
    one_off[0, 0] = 0
    top0 = o.copy()
    top0[0] = 0
    four1 = z.copy()
    four1[0] = 1
    ref = [half, half, o, z, half]
    s1 = [half, half, z, z, one_off]
    s2 = [half, z, top0, four1, one_off]
    images = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(5)])
    run = fake_run(tmp_path, images, gt=np.stack(ref))
    p = Pipeline(run)
    supervised = StageRef(run, "supervised", 0, None)  # its snapshots are the three table nets
    monkeypatch.setattr(st_stability, "snapshot_models", lambda sup, k: [TableNet(s1), TableNet(s2), TableNet(ref)])
    add_stability(p, supervised, 3)
    run_stages(run.run_dir, p.stages, out_dir=tmp_path)
    info = json.loads((run.run_dir / "stages" / "0-stability" / "stability.json").read_text())
    # image 0: identical -> 1. image 1: s1 = ref (1); s2 all 0: IoU0 8/16, IoU1 0/8 -> 1/4; mean 5/8.
    # image 2 (ref all 1): s1 all 0 -> IoU0 0/16, IoU1 0/16 -> 0; s2 top row 0 -> IoU1 12/16, IoU0 0/4 -> 3/8.
    # image 3 (ref all 0): s1 -> 1 (class 1 absent from both); s2 row of 1 -> IoU0 12/16, IoU1 0/4 -> 3/8.
    # image 4: one class-1 pixel predicted 0 by both: IoU1 7/8, IoU0 8/9.
    expected = [1.0, 5 / 8, 3 / 16, (1 + 3 / 8) / 2, (7 / 8 + 8 / 9) / 2]
    assert np.allclose(info["scores"], expected)
    # sorted: 0 (1.0), 4 (.88), 3 (.69), 1 (.625), 2 (.19); the top len//2 = 2 are reliable
    assert info["reliable"] == ["u0", "u4"] and info["unreliable"] == ["u3", "u1", "u2"]
    # benchmark mode: the final snapshot equals the ground truth here
    assert info["quality"]["final_snapshot_miou_reliable"] == pytest.approx(1.0)


def test_snapshot_steps() -> None:
    assert snapshot_steps(15, 3) == [5, 10, 15]
    assert snapshot_steps(20, 3) == [6, 13, 20]  # E//3, 2E//3, E as the released code's epochs
    assert snapshot_steps(10, 2) == [5, 10]


# -------------------------------------------------------------------------------------- label stage
def _label(run: RunContext, tmp: Path, name: str, **kw) -> StageRef:  # noqa: ANN003
    run = dataclasses.replace(run, run_dir=tmp / name)
    p = label(run, name, kw.pop("net", None) or pixel_net(), **kw)
    run_stages(run.run_dir, p.stages, out_dir=tmp)
    return p[name]


def test_label_stage_flip_equivariant_and_exact(tmp_path: Path) -> None:
    images = random_images(5)
    gt = (images[..., 0] > 127).astype(np.uint8)
    run = fake_run(tmp_path, images, gt=gt)
    plain_stage = _label(run, tmp_path, "plain")
    plain, flip = plain_stage.round(), _label(run, tmp_path, "flip", tta_flip=True, previous=[plain_stage]).round()
    with torch.no_grad():
        probs = pixel_net()(to_input(images)).softmax(1).numpy()
    assert plain.stems == [f"u{i}" for i in range(5)]
    for i, stem in enumerate(plain.stems):
        assert np.array_equal(plain.labels(stem), flip.labels(stem))
        assert np.array_equal(plain.confidence(stem), flip.confidence(stem))
        assert np.array_equal(plain.labels(stem), probs[i].argmax(0))  # independent: the net itself
        assert np.abs(plain.confidence(stem) - probs[i].max(0)).max() <= 0.5 / 255 + 1e-6
    assert flip.provenance["tta"]["views"] == 2 and plain.provenance["tta"]["views"] == 1
    assert flip.provenance["policy"]["name"] == "all" and flip.provenance["model_sha256"]
    assert flip.stats["flip_rate"] == 0.0 and flip.stats["flip_compared_images"] == 5
    pred = probs.argmax(1)
    fg_iou = ((pred == 1) & (gt == 1)).sum() / ((pred == 1) | (gt == 1)).sum()
    assert flip.stats["quality"]["per_class_iou"][1] == pytest.approx(fg_iou)


def test_label_stage_fits_a_copy_of_the_policy_and_skips_gt_outside_benchmark(tmp_path: Path) -> None:
    images = random_images(4, seed=1)
    run = fake_run(tmp_path, images)
    policy = ClassBalanced(0.5, sample_stride=1)
    rnd = _label(run, tmp_path, "cbc", policy=policy, stems=["u2", "u0"]).round()
    assert policy.thresholds is None  # the caller's policy is not mutated
    with torch.no_grad():
        probs = pixel_net()(to_input(images[[2, 0]])).softmax(1).numpy()
    ref = ClassBalanced(0.5, sample_stride=1).fit(list(probs))
    assert np.allclose(rnd.provenance["policy"]["params"]["thresholds"], ref.thresholds)
    assert rnd.stems == ["u2", "u0"]
    for k, stem in enumerate(rnd.stems):
        assert np.array_equal(rnd.labels(stem), ref(probs[k])[0])
    assert rnd.stats["quality"] is None and 0 < rnd.stats["coverage"] < 1


KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.methods.test_self_training import fake_run, label, pixel_net, random_images
from semiseg.pipeline.stages import run_stages

class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = pixel_net()
    def forward(self, x):
        time.sleep(0.4)
        return self.net(x)

tmp = Path({tmp!r})
run = fake_run(tmp, random_images(8))
run_stages(run.run_dir, label(run, "label", Slow).stages, out_dir=tmp)
"""


def test_kill_during_labelling_leaves_no_round_and_resume_completes(tmp_path: Path) -> None:
    script = tmp_path / "label.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), tmp=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    sdir = tmp_path / "run" / "stages" / "0-label"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(sdir.glob(".pseudo.w*.tmp/labels/0.png")):
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    assert list(sdir.glob(".pseudo.w*.tmp/labels/0.png")), "labelling did not start in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(sdir.glob(".pseudo.w*.tmp"))  # the killed writer's leftovers
    assert not (sdir / ROUND / "DONE").exists() and not (sdir / "DONE").exists()
    run = fake_run(tmp_path, random_images(8))
    run_stages(run.run_dir, label(run, "label", pixel_net).stages, out_dir=tmp_path)  # resume
    assert (sdir / "DONE").exists() and not list(sdir.glob(".pseudo.w*.tmp"))
    resumed = load_round(sdir)
    fresh = _label(fake_run(tmp_path / "f", random_images(8)), tmp_path / "f", "fresh").round()
    assert resumed.stems == fresh.stems and len(resumed) == 8
    for s in fresh.stems:
        assert np.array_equal(resumed.labels(s), fresh.labels(s))


# ------------------------------------------------------------------------------------- training set
def test_pseudo_dataset_oversamples_labeled_and_augments_pseudo_only(tmp_path: Path) -> None:
    images = random_images(7, seed=2)
    lab = random_images(3, seed=3)
    lab_masks = (lab[..., 1] > 100).astype(np.uint8)
    run = fake_run(tmp_path, images, labeled=lab, labeled_masks=lab_masks)
    rdir = _label(run, tmp_path, "lab").path
    rnd = load_round(rdir)
    ds = pseudo_dataset(run, [(rdir, ["u1", "u3", "u5", "u6"]), (rdir, ["u0"])], seed=0, strong=True)
    # ST/ST++: labeled * ceil(U / L) + U = 3 * ceil(5 / 3) + 5
    assert len(ds) == oversampled_size(3, 5) == 11 and ds.n_labeled == 6
    cut = changed = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for k in range(len(ds)):
            item = ds[k]
            if k < 6:  # labeled: ground truth, weak view only (an identity here)
                assert item["pseudo"] == 0 and item["index"] == k % 3
                assert torch.equal(item["image"], to_input(lab[k % 3]))
                assert torch.equal(item["mask"], torch.from_numpy(lab_masks[k % 3]).long())
            else:
                stem = ["u1", "u3", "u5", "u6", "u0"][k - 6]
                assert item["pseudo"] == 1 and item["index"] == int(stem[1:])
                label = torch.from_numpy(rnd.labels(stem)).long()
                keep = item["mask"] != 255
                assert torch.equal(item["mask"][keep], label[keep])
                cut += int((~keep).any())
                changed += int(not torch.equal(item["image"], to_input(images[int(stem[1:])])))
    assert cut > 0 and changed > 0  # cutout and colour changes reached the pseudo-labeled images
    weak = pseudo_dataset(run, [(rdir, ["u1"])], seed=0, strong=False)
    assert len(weak) == 3 + 1 and torch.equal(weak[3]["image"], to_input(images[1]))
    with pytest.raises(DataError, match="twice"):
        pseudo_dataset(run, [(rdir, ["u1"]), (rdir, ["u1"])], seed=0)


def test_oversampled_size() -> None:
    assert oversampled_size(3, 5) == 11 and oversampled_size(4, 4) == 8 and oversampled_size(5, 0) == 5
    assert oversampled_size(2, 7) == 2 * math.ceil(7 / 2) + 7


# ------------------------------------------------------------------------------ ST / ST++ end to end
TINY_ENCODER = "tu-mobilenetv3_small_050"  # 0.3 M parameters at depth 3: small checkpoints, fast steps


def synthetic_run(data: Path, out: Path, name: str, method: str, *, steps: int = 12,
                  **options: object) -> tuple[RunContext, Method]:
    """A tiny run on 60 synthetic 64 px images, prepared in-process (what the CLI does, minus files)."""
    src = generate_synthetic(data / "synthetic", n=60, size=(64, 64))
    source = folder_source(src, classes=synthetic_classes("binary"), mask_format="index")
    cfg = config_from_dict({
        "name": name, "out_dir": str(out), "seed": 0,
        "data": {"size": [64, 64], "benchmark_gt": True, "cache_dir": str(data / "cache")},
        "model": {"arch": "Unet", "encoder": TINY_ENCODER, "weights": "none", "decoder_channels": [16, 8, 8],
                  "options": {"encoder_depth": 3}},
        "train": {"steps": steps, "batch_size": 4, "eval_every": 4, "checkpoint_every": 4, "progress": False,
                  "augment": {"scale": [0.75, 1.25]}},
        "method": {"name": method, **options}})
    splits = make_splits(source, seed=0, labeled=0.15, val=0.15, test=0.2, fixed={})
    seed_everything(0)
    run = RunContext(cfg, out / name, source, splits, torch.device("cpu"))
    return run, get_method(method)(run, cfg.method)


# the CLI's tiny st++ run: 12 supervised steps (snapshots at 4 and 8), 8 steps per re-training
STPP_SETS = ["data.size=[64,64]", "data.options.n=60", "data.options.size=64", "data.benchmark_gt=true",
             f"model.encoder={TINY_ENCODER}", "model.weights=none", "model.decoder_channels=[16,8,8]",
             "model.options.encoder_depth=3",
             "train.steps=12",
             "train.eval_every=4", "train.checkpoint_every=4", "train.batch_size=4", "train.threads=1",
             "train.progress=false", "train.deterministic=true", "split.labeled=0.15", "split.val=0.15",
             "split.test=0.2", "method.name=st++", "method.retrain_steps=8", "method.tta_scales=[1.0]",
             "method.tta_flip=true", "name=stpp"]
STPP_STAGES = ["0-supervised", "1-stability", "2-label-reliable", "3-retrain-reliable", "4-label-unreliable",
               "5-retrain-all"]

DRIVER = """
import sys, time
if {slow!r}:  # slow every optimizer step and forward pass so that the parent can kill inside a stage
    from semiseg.engine.trainer import Trainer
    from semiseg.pseudo.labeler import Labeler
    opt, fwd = Trainer.optimize, Labeler._forward
    Trainer.optimize = lambda self, n, loss: (time.sleep(0.2), opt(self, n, loss))[1]
    Labeler._forward = lambda self, x: (time.sleep(0.1), fwd(self, x))[1]
from semiseg.cli import main
sys.argv = ["semiseg", *{args!r}]
main()
"""


def _cli(tmp: Path, args: list[str], *, slow: bool) -> subprocess.Popen:
    script = tmp / "drive.py"
    script.write_text(DRIVER.format(slow=slow, args=args))
    env = {**os.environ, "SEMISEG_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _train(out: Path) -> list[str]:
    return ["train", *[x for s in [*STPP_SETS, f"out_dir={out}"] for x in ("--set", s)]]


def _inside(stage: Path) -> bool:
    """The stage has made progress and is not finished: a training checkpoint or a round being written."""
    if (stage / "DONE").exists() or not stage.is_dir():
        return False
    if stage.name.split("-", 1)[1] in ("supervised", "retrain-reliable", "retrain-all"):
        return (stage / "checkpoints" / "last.pt").exists()
    if stage.name.endswith("stability"):
        return True
    return bool(list(stage.glob(".pseudo.w*.tmp/labels/0.png")))


def _err(proc: subprocess.Popen) -> str:
    return proc.stderr.read().decode()[-3000:] if proc.stderr else ""


@pytest.mark.slow
def test_st_plus_plus_resumes_after_sigkill_in_every_stage(tmp_path: Path) -> None:
    ref = _cli(tmp_path, _train(tmp_path / "ref"), slow=False)
    assert ref.wait(timeout=600) == 0, _err(ref)
    run_dir = tmp_path / "killed" / "stpp"
    stages = run_dir / "stages"
    for i, name in enumerate(STPP_STAGES):
        proc = _cli(tmp_path, _train(tmp_path / "killed") if i == 0 else ["resume", str(run_dir)], slow=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not _inside(stages / name):
            time.sleep(0.02)
        assert proc.poll() is None, f"{name}: {_err(proc)}"
        assert _inside(stages / name), f"{name} did not start in time"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (stages / name / "DONE").exists(), f"{name} finished before the kill"
    last = _cli(tmp_path, ["resume", str(run_dir)], slow=False)
    assert last.wait(timeout=600) == 0, _err(last)

    rstages = tmp_path / "ref" / "stpp" / "stages"
    a = load_checkpoint(stages / "5-retrain-all" / "checkpoints" / "last.pt")["nets"]["model"]
    b = load_checkpoint(rstages / "5-retrain-all" / "checkpoints" / "last.pt")["nets"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    best_a = load_checkpoint(stages / "5-retrain-all" / "checkpoints" / "best.pt")["net"]
    best_b = load_checkpoint(rstages / "5-retrain-all" / "checkpoints" / "best.pt")["net"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    for name in ("0-supervised", "3-retrain-reliable", "5-retrain-all"):
        assert (stages / name / "metrics.jsonl").read_text() == (rstages / name / "metrics.jsonl").read_text()
    assert (stages / "0-supervised" / "checkpoints" / "snapshot-4.pt").exists()
    info = json.loads((stages / "1-stability" / "stability.json").read_text())
    assert info == json.loads((rstages / "1-stability" / "stability.json").read_text())
    assert len(info["reliable"]) == len(info["stems"]) // 2 and info["quality"] is not None
    for name, half in (("2-label-reliable", "reliable"), ("4-label-unreliable", "unreliable")):
        ra, rb = load_round(stages / name), load_round(rstages / name)
        assert ra.stems == rb.stems == info[half]
        assert all(np.array_equal(ra.labels(s), rb.labels(s)) for s in ra.stems)
    assert ra.provenance["checkpoint"]["path"] == str(stages / "3-retrain-reliable" / "checkpoints" / "best.pt")
    res_a = json.loads((run_dir / "results.json").read_text())
    res_b = json.loads((tmp_path / "ref" / "stpp" / "results.json").read_text())
    assert res_a["test"]["dice"] == res_b["test"]["dice"] and res_a["val"] == res_b["val"]


@pytest.fixture
def one_thread():  # noqa: ANN201
    """Training in-process on a shared 2-core machine: one thread is faster and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_second_run_reuses_the_supervised_stage(tmp_path: Path, one_thread: None) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    run, sup = synthetic_run(data, out, "sup", "supervised", steps=8)
    run_stages(run.run_dir, sup.stages(), out_dir=out, log=lambda m: None)
    run2, st = synthetic_run(data, out, "st", "self-training", steps=8, retrain_steps=4, tta_scales=[1.0],
                             tta_flip=False)
    dirs = run_stages(run2.run_dir, st.stages(), out_dir=out, log=lambda m: None)
    assert [d.name for d in dirs] == ["0-supervised", "1-label", "2-retrain", "3-diagnostics"]
    done = json.loads((dirs[0] / "DONE").read_text())
    assert done["reused_from"] == str(run.run_dir / "stages" / "0-supervised")
    assert (dirs[0] / "metrics.jsonl").read_text() == (run.run_dir / "stages" / "0-supervised" /
                                                       "metrics.jsonl").read_text()
    rnd = load_round(dirs[1])
    assert rnd.stems == run2.splits.unlabeled and rnd.stats["quality"] is not None
    assert rnd.provenance["checkpoint"]["path"] == str(dirs[0] / "checkpoints" / "best.pt")
    diag = json.loads((run2.run_dir / "diagnostics.json").read_text())
    assert [r["round"] for r in diag["rounds"]] == ["1-label"]
    assert diag["rounds"][0]["foreground_dice"] == rnd.stats["quality"]["foreground_dice"]
    assert [t["stage"] for t in diag["trainings"]] == ["0-supervised", "2-retrain"]
    best = load_checkpoint(dirs[2] / "checkpoints" / "best.pt")["net"]
    final = st.final_model().state_dict()  # the re-training's best-on-val model, not the diagnostics stage
    assert all(torch.equal(final[k], best[k]) for k in best)


def test_plans_and_key_chain(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    _, st2 = synthetic_run(data, out, "a", "self-training", iterations=2)
    assert [s.name for s in st2.stages()] == ["supervised", "label-1", "retrain-1", "label-2", "retrain-2",
                                              "diagnostics"]
    run, pp = synthetic_run(data, out, "b", "st++", extra_rounds=1)
    stages = pp.stages()
    assert [s.name for s in stages] == [n.split("-", 1)[1] for n in STPP_STAGES] + [
        "label-extra-1", "retrain-extra-1", "diagnostics"]
    sup_key = st2.stages()[0].key
    # re-trainings keyed by their length: the epoch rule for the reliable half and for all pseudo labels
    n_unl = len(run.splits.unlabeled)
    assert [s.key["steps"] for s in stages if s.name.startswith("retrain")] == \
        [pp.retrain_steps(n_unl // 2), pp.retrain_steps(n_unl), pp.retrain_steps(n_unl)]
    # its own key: the snapshots are extra outputs
    assert stages[0].key == {**sup_key, "variant": {**sup_key["variant"], "snapshots": [4, 8]}}
    _, weak = synthetic_run(data, out, "c", "st++", extra_rounds=1, strong_aug=False)
    same = [a.key_hash() == b.key_hash() for a, b in zip(stages, weak.stages(), strict=True) if a.key]
    # only the re-trainings (and what is labelled by their models) depend on the re-training options
    assert same == [True, True, True, False, False, False, False, False]
    _, tta = synthetic_run(data, out, "d", "st++", extra_rounds=1, tta_flip=False)
    assert [a.key_hash() == b.key_hash() for a, b in zip(stages, tta.stages(), strict=True) if a.key] == \
        [True, True, False, False, False, False, False, False]


def test_supervised_dice_control_is_its_own_stage_and_minimises_dice(tmp_path: Path) -> None:
    """``supervised loss=dice`` (momentum-pl's loss without its pseudo labels) must not reuse the cross-entropy
    teacher every other method shares, and its step must optimise the Dice loss."""
    from semiseg.losses import LABELED_LOSSES, cross_entropy, dice_loss
    from semiseg.methods.supervised import SupervisedTask

    data, out = tmp_path / "data", tmp_path / "runs"
    _, ce = synthetic_run(data, out, "ce", "supervised")
    _, st = synthetic_run(data, out, "st", "self-training")
    _, dice = synthetic_run(data, out, "dice", "supervised", loss="dice")
    assert ce.stages()[0].key_hash() == st.stages()[0].key_hash()  # the default stays the shared teacher
    assert dice.stages()[0].key_hash() != ce.stages()[0].key_hash()
    assert dice.stages()[0].key["options"]["loss"] == "dice"

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    mask = torch.randint(0, 3, (2, 4, 4))

    class Ctx:
        def autocast(self):  # noqa: ANN202
            return torch.autocast("cpu", enabled=False)

        def optimize(self, name: str, loss: torch.Tensor) -> None:
            self.loss = loss

    net = nn.Conv2d(3, 3, 1)
    nn.init.dirac_(net.weight)
    nn.init.zeros_(net.bias)  # the identity: the net's output is the logits
    for loss_fn in (dice_loss, cross_entropy):
        ctx = Ctx()
        got = SupervisedTask(net, None, loss=loss_fn).train_step({"labeled": {"image": logits, "mask": mask}}, ctx)
        assert got["loss"] == pytest.approx(loss_fn(logits, mask).item())
    assert dice_loss(logits, mask).item() != pytest.approx(cross_entropy(logits, mask).item())
    both = LABELED_LOSSES["cross-entropy+dice"](logits, mask)
    assert both.item() == pytest.approx(dice_loss(logits, mask).item() + cross_entropy(logits, mask).item())
