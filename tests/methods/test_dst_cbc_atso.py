"""DST-CBC and the ATSO family: CBC through the round code, dynamic-loss wiring, ATSO's halves,
optimizer reset / fine-tuning per round, self-learning vs STSO initialisation, resume after SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.api import config_from_dict
from semiseg.data.cache import CachedArrays
from semiseg.data.classes import ClassTable
from semiseg.data.splits import Splits
from semiseg.data.types import DataSource
from semiseg.engine.checkpoint import load_checkpoint, save_checkpoint
from semiseg.engine.task import StepContext
from semiseg.engine.trainer import Trainer
from semiseg.methods.atso import atso_halves
from semiseg.methods.dst_cbc import DstCbc, DstCbcOptions, DstCbcTask, LegacyRandomResize
from semiseg.methods.offline import student_loader
from semiseg.methods.registry import get_method
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.labeling import load_round
from semiseg.pipeline.plan import BestOf, StageRef
from semiseg.pipeline.stages import run_stages
from semiseg.pipeline.training import new_model

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ helpers
def synthetic_run(out: Path, method: str, options: dict, *, size: int = 48, n: int = 60, steps: int = 6,
                  data_dir: Path | None = None, name: str = "run") -> tuple[RunContext, object]:
    """A run of ``method`` on a tiny synthetic set (benchmark mode), built without the CLI."""
    from semiseg.data.sources import folder_source
    from semiseg.data.splits import make_splits
    from semiseg.data.synthetic import generate_synthetic
    from semiseg.engine.checkpoint import seed_everything

    root = generate_synthetic((data_dir or out) / f"syn{size}-{n}", n=n, size=(size, size))
    cfg = config_from_dict({
        "method": {"name": method, **options},
        "data": {"size": [size, size], "benchmark_gt": True, "cache_dir": str((data_dir or out) / "cache")},
        "model": {"decoder_channels": [16, 8, 8, 8, 8]},
        "train": {"steps": steps, "batch_size": 4, "eval_every": 3, "checkpoint_every": 2, "progress": False,
                  "deterministic": True, "device": "cpu"}})
    source = folder_source(root)
    splits = make_splits(source, seed=0, labeled=0.2, val=0.15, test=0.15)
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    run = RunContext(cfg, run_dir, source, splits, torch.device("cpu"))
    return run, get_method(method)(run, cfg.method)


def execute(method_obj, out: Path) -> list[Path]:  # noqa: ANN001
    return run_stages(method_obj.run.run_dir, method_obj.stages(), out_dir=out, log=lambda s: None)


def state_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Spy:
    """Records, per training stage: the weights the task starts from, and the optimizer state size
    and learning rate at its first step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.start: dict[str, str] = {}
        self.first: dict[str, tuple[int, float]] = {}
        fit, optimize = Trainer.fit, Trainer.optimize
        spy = self

        def fit_spy(trainer: Trainer):  # noqa: ANN202
            spy.start[str(trainer.stage_dir)] = state_hash(trainer.task.eval_net().state_dict())
            return fit(trainer)

        def optimize_spy(trainer: Trainer, name: str, loss: torch.Tensor) -> None:
            key = str(trainer.stage_dir)
            if key not in spy.first:
                opt = trainer.optimizers[name]
                spy.first[key] = (len(opt.state), opt.param_groups[0]["lr"])
            optimize(trainer, name, loss)

        monkeypatch.setattr(Trainer, "fit", fit_spy)
        monkeypatch.setattr(Trainer, "optimize", optimize_spy)


def best_hash(stage: Path) -> str:
    return state_hash(load_checkpoint(stage / "checkpoints" / "best.pt")["net"])


# ------------------------------------------------------------- CBC through the round code (stub model)
C = 3


def prob_table() -> np.ndarray:
    """Red value v -> probabilities: v < 160 is class 0, else class 1; class 2 is never the argmax."""
    table = np.zeros((256, C))
    for v in range(256):
        q = 0.45 + 0.54 * ((v if v < 160 else v - 160) / (160 if v < 160 else 96))
        other = 1 - q
        table[v] = (q, 0.7 * other, 0.3 * other) if v < 160 else (0.7 * other, q, 0.3 * other)
    return table


class TableNet(nn.Module):
    """Logits log(table[red value]): softmax gives the table's probabilities exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("logp", torch.log(torch.tensor(prob_table(), dtype=torch.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0] * 255.0  # toy nets see to_input's [0, 1] images
        v = red.round().clamp(0, 255).long()
        return self.logp[v].permute(0, 3, 1, 2)


def fake_run(tmp: Path, images: np.ndarray, options: dict) -> RunContext:
    n, h, w = images.shape[:3]
    cfg = config_from_dict({"method": {"name": "dst-cbc", **options}, "data": {"size": [h, w]},
                            "train": {"batch_size": 2, "progress": False}})
    source = DataSource("fake", None, ClassTable(("a", "b", "c")), [], lambda p: None)
    stems = [f"u{i}" for i in range(n)]
    run = RunContext(cfg, tmp / "run", source, Splits(labeled=["l0"], unlabeled=stems), torch.device("cpu"))
    run._arrays["unlabeled"] = CachedArrays(images, None, stems, [(h, w)] * n, [False] * n, tmp)
    return run


def expected_cbc(images: np.ndarray, ratio: float, stride: int) -> tuple[np.ndarray, list[int]]:
    """Per class, the confidence of rank int(n·ratio) from the top among every stride-th pixel."""
    table = prob_table()
    ks, counts = [], []
    probs = table[images[..., 0].astype(int)]  # N×H×W×C
    conf, label = probs.max(-1), probs.argmax(-1)
    sample_c = np.concatenate([c.ravel()[::stride] for c in conf])
    sample_l = np.concatenate([lab.ravel()[::stride] for lab in label])
    for c in range(C):
        values = sorted(sample_c[sample_l == c].tolist(), reverse=True)
        counts.append(len(values))
        ks.append(1e-4 if ratio >= 1 else (values[int(len(values) * ratio)] if values else np.inf))
    return np.array(ks), counts


def test_cbc_thresholds_and_labels_through_the_round_stages(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = rng.integers(0, 256, size=(4, 32, 32))
    run = fake_run(tmp_path, images, {"ratios": [0.25, 1.0]})
    method = DstCbc(run, DstCbcOptions(ratios=[0.25, 1.0]))
    plan = method.pipeline
    monkeypatch.setattr(StageRef, "model", lambda ref, net=None, which="best": TableNet())
    save_checkpoint(plan["supervised"].path / "checkpoints" / "best.pt", {"net": {}, "metric": 0.5})
    by_name = {s.name: s for s in plan.stages}
    for name in ("cbc-1", "cbc-2"):
        plan[name].path.mkdir(parents=True)
        by_name[name].run(plan[name].path)

    probs = prob_table()[images[..., 0].astype(int)]
    conf, argmax = probs.max(-1), probs.argmax(-1)
    # ratio 0.25: exact per-class quantiles of the stride-16 sample; class 2 (empty) selects nothing
    ks, counts = expected_cbc(images, 0.25, 16)
    rnd = load_round(plan["cbc-1"].path)
    params = rnd.provenance["policy"]["params"]
    assert params["sample_counts"] == counts and counts[2] == 0 and sum(counts) == 4 * 1024 // 16
    np.testing.assert_allclose(params["thresholds"][:2], ks[:2], rtol=1e-5)
    assert params["thresholds"][2] > 1.0
    assert rnd.provenance["checkpoint"]["path"].endswith("0-supervised/checkpoints/best.pt")
    for i in range(4):
        want = np.where(conf[i] >= ks[argmax[i]], argmax[i], 255)
        np.testing.assert_array_equal(rnd.labels(f"u{i}"), want)
    sample_sel = [(conf[i].ravel()[::16] >= ks[argmax[i].ravel()[::16]]) for i in range(4)]
    assert abs(np.concatenate(sample_sel).mean() - 0.25) < 0.05  # about a quarter of each class
    # ratio 1: every pixel gets its argmax, the empty class does not crash anything
    rnd2 = load_round(plan["cbc-2"].path)
    assert rnd2.provenance["policy"]["params"]["thresholds"] == pytest.approx([1e-4] * 3)
    assert rnd2.stats["coverage"] == 1.0 and rnd2.stats["previous_round"] is not None
    for i in range(4):
        np.testing.assert_array_equal(rnd2.labels(f"u{i}"), argmax[i])


def test_methods_without_enough_unlabeled_images_say_so(tmp_path: Path) -> None:
    from semiseg.errors import ConfigError
    from semiseg.methods.atso import Atso, AtsoOptions

    run = fake_run(tmp_path, np.zeros((1, 32, 32, 3), np.uint8), {})
    with pytest.raises(ConfigError, match="at least 2 unlabeled"):
        Atso(run, AtsoOptions()).stages()
    run.splits.unlabeled = []
    with pytest.raises(ConfigError, match="no unlabeled images"):
        DstCbc(run, DstCbcOptions()).stages()


# ---------------------------------------------------------------------------- dynamic loss wiring
class Pixel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_dynamic_loss_on_a_pseudo_then_labeled_batch_by_hand() -> None:
    torch.manual_seed(0)
    net = Pixel()
    pseudo = {"image": torch.randn(3, 3, 2, 2), "mask": torch.tensor([[[0, 1], [255, 1]]] * 3)}
    labeled = {"image": torch.randn(2, 3, 2, 2), "mask": torch.tensor([[[1, 0], [0, 255]]] * 2)}
    task = DstCbcTask(net, None, None, gamma=3.0)  # type: ignore[arg-type]
    seen = {}
    ctx = StepContext(0, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False),
                      lambda name, loss: seen.update(name=name, loss=loss.item()), 1)
    task.train_step({"pseudo": pseudo, "labeled": labeled}, ctx)

    with torch.no_grad():  # by hand, per pixel, in float64
        total, count = 0.0, 0
        for part, weighted in ((pseudo, True), (labeled, False)):
            logp = net(part["image"]).double().log_softmax(1)
            for b, y, x in np.ndindex(*part["mask"].shape):
                t = int(part["mask"][b, y, x])
                if t == 255:
                    continue
                w = float(logp[b, t, y, x].exp()) ** 3 if weighted else 1.0
                total, count = total - w * float(logp[b, t, y, x]), count + 1
    assert seen["name"] == "model"
    assert seen["loss"] == pytest.approx(total / count, rel=1e-5)
    assert count == 3 * 3 + 2 * 3  # normalised by the non-ignored pixels, not by the weights


def test_dst_round_learns_its_pseudo_labels_on_the_strong_view() -> None:
    """A model that labelled the weak view with confidence ~1 has nothing left to learn there (the dynamic
    loss of its own labels is ~0); on the strong view (strong_aug, the default) the same labels are a real
    term, and a cutout's ignored pixels stay out of it."""
    from semiseg.data.transforms import StrongTransform

    torch.manual_seed(0)
    net = Pixel()
    with torch.no_grad():  # logit(1) - logit(0) = 40 (red - 0.5): confident wherever red is not mid-grey
        net.conv.weight.zero_()
        net.conv.weight[1, 0] = 40.0
        net.conv.bias.copy_(torch.tensor([0.0, -20.0]))
    rng = np.random.default_rng(0)
    images = rng.choice(np.array([20, 235], np.uint8), size=(4, 16, 16, 3))
    weak = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pseudo_labels = net(weak).argmax(1)
    strong = StrongTransform(p_jitter=1.0, p_gray=1.0, p_blur=0.0, p_cutout=1.0)
    views = [strong(img, lab.numpy().astype(np.uint8), np.random.default_rng(i))
             for i, (img, lab) in enumerate(zip(images, pseudo_labels, strict=True))]
    pseudo = {"image": weak, "mask": pseudo_labels,
              "image_strong": torch.stack([torch.from_numpy(v).permute(2, 0, 1).float() / 255 for v, _ in views]),
              "mask_strong": torch.stack([torch.from_numpy(m).long() for _, m in views])}
    labeled = {"image": weak[:1], "mask": pseudo_labels[:1]}
    losses = {}
    for name, batch in (("weak", {k: pseudo[k] for k in ("image", "mask")}), ("strong", pseudo)):
        task = DstCbcTask(net, None, None, gamma=0.0)  # type: ignore[arg-type]
        ctx = StepContext(0, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False),
                          lambda n, loss, name=name: losses.update({name: loss.item()}), 1)
        task.train_step({"pseudo": batch, "labeled": labeled}, ctx)
    assert losses["weak"] < 1e-3  # inert: the weak view teaches the model what it already says
    assert losses["strong"] > 100 * losses["weak"]
    x = torch.cat([pseudo["image_strong"], labeled["image"]])
    y = torch.cat([pseudo["mask_strong"], labeled["mask"]])
    assert (y == 255).any()  # the cutout
    assert losses["strong"] == pytest.approx(F.cross_entropy(net(x), y, ignore_index=255).item(), rel=1e-5)


def test_legacy_random_resize_distorts_the_aspect_ratio() -> None:
    t = LegacyRandomResize((32, 32), (1.0, 2.0), pad_label=255, hflip=False)
    draws = [t.draw(np.random.default_rng(i)) for i in range(50)]
    assert all(32 <= h <= 64 and 32 <= w <= 64 for h, w in draws)
    assert sum(h != w for h, w in draws) > 40  # independent sides: the aspect ratio changes
    img, mask = t(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8), np.random.default_rng(0))
    assert img.shape == (32, 32, 3) and mask.shape == (32, 32)


# ------------------------------------------------------------------------------ tiny real runs
def test_dst_cbc_fine_tunes_the_best_so_far_with_a_fresh_optimizer(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    spy = Spy(monkeypatch)
    run, method = synthetic_run(tmp_path, "dst-cbc", {"ratios": [0.5, 1.0], "round_steps": 6})
    execute(method, tmp_path)
    plan = method.pipeline
    sup, r1, r2 = plan["supervised"].path, plan["round-1"].path, plan["round-2"].path
    for stage in (r1, r2):  # a new optimizer (empty state) and the poly schedule restarted each round
        assert spy.first[str(stage)] == (0, pytest.approx(run.config.train.lr))
    refs = [plan["supervised"], plan["round-1"], plan["round-2"]]
    src1, src2 = BestOf(refs[:1]).resolve().path, BestOf(refs[:2]).resolve().path
    assert spy.start[str(r1)] == best_hash(src1)  # fine-tuned, not re-initialised
    assert spy.start[str(r2)] == best_hash(src2)
    assert load_round(plan["cbc-2"].path).provenance["checkpoint"]["path"] == str(src2 / "checkpoints" / "best.pt")
    metrics = [load_checkpoint(d / "checkpoints" / "best.pt")["metric"] for d in (sup, r1, r2)]
    final = BestOf(refs).resolve().path
    assert final == [sup, r1, r2][int(np.argmax(metrics))]
    assert state_hash(method.final_model().state_dict()) == best_hash(final)
    diag = json.loads((run.run_dir / "diagnostics.json").read_text())
    rows = diag["generations"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["pseudo_labels"]["coverage"] == 1.0 and rows[1]["pseudo_labels"]["coverage"] < 1.0
    assert all(r["test"]["headline"] is not None for r in rows)


def test_atso_never_labels_a_half_with_a_model_trained_on_it(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    spy = Spy(monkeypatch)
    # one labelling view, so that a half's labels are exactly its labeller's predictions (compared below)
    run, method = synthetic_run(tmp_path, "atso", {"generations": 2, "generation_steps": 4, "tta_flip": False},
                                size=64, n=48)
    execute(method, tmp_path)
    plan = method.pipeline
    a, b = atso_halves(list(run.splits.unlabeled), run.stage_seed("atso-halves"))
    assert not set(a) & set(b) and sorted(a + b) == sorted(run.splits.unlabeled) and abs(len(a) - len(b)) <= 1
    label_stages = [s.name for s in plan.stages if s.name.startswith("label-")]
    assert label_stages == ["label-1A", "label-1B", "label-2A", "label-2B", "label-finalA", "label-finalB"]
    by_dir = {str(plan[s.name].path / "checkpoints" / "best.pt"): s.name for s in plan.stages}
    for name in label_stages:
        rnd = load_round(plan[name].path)
        assert sorted(rnd.stems) == sorted(a if name.endswith("A") else b)  # the halves never change
        teacher = by_dir[rnd.provenance["checkpoint"]["path"]]
        if teacher == "supervised":
            assert name in ("label-1A", "label-1B")
            continue
        trained_on = json.loads((plan[teacher].path / "training_set.json").read_text())["pseudo_stems"]
        assert trained_on and not set(trained_on) & set(rnd.stems), (name, teacher)
        assert teacher.endswith("B" if name.endswith("A") else "A")
    # one initialisation per run seed: the teacher and every from-scratch student start from the same weights
    assert spy.start[str(plan["supervised"].path)] == state_hash(new_model(run).state_dict())
    assert state_hash(new_model(run, run.init_seed + 1).state_dict()) != state_hash(new_model(run).state_dict())
    for s in plan.stages:  # every ATSO student starts from scratch
        if s.name.startswith("student-") or s.name == "final":
            record = json.loads((plan[s.name].path / "training_set.json").read_text())
            assert record["init"] == "scratch"
            assert spy.start[str(plan[s.name].path)] == state_hash(new_model(run).state_dict())
    final = json.loads((plan["final"].path / "training_set.json").read_text())
    assert final["pseudo_stems"] == sorted(a + b) and final["rounds"] == ["label-finalA", "label-finalB"]
    # the lazy-learning table: labels of half A made by M^B_t are scored like M^B_t on A (64 px: no padding)
    rows = json.loads((run.run_dir / "diagnostics.json").read_text())["generations"]
    assert [r["generation"] for r in rows] == [0, 1, 2, "final"]
    for t in (1, 2):
        nxt = rows[t + 1]["pseudo_labels"]["A" if t == 1 else "A+B"]
        labels_a = plan["label-2A" if t == 1 else "label-finalA"].round().stats["quality"]["foreground_dice"]
        assert rows[t]["models"]["B"]["reference"]["A"]["dice"] == pytest.approx(labels_a, abs=1e-9)
        assert nxt["coverage"] == 1.0 and set(rows[t]["models"]) == {"A", "B"}
        assert rows[t]["models"]["A"]["test"]["headline"] is not None


def test_self_learning_continues_from_the_teacher_and_stso_restarts(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    spy = Spy(monkeypatch)
    runs = {}
    for name in ("self-learning", "stso"):  # one out_dir: stso reuses the supervised teacher
        run, method = synthetic_run(tmp_path, name, {"generations": 2, "generation_steps": 4}, name=name)
        execute(method, tmp_path)
        runs[name] = (run, method.pipeline)
    run, plan = runs["self-learning"]
    assert "reused_from" in json.loads((runs["stso"][1]["supervised"].path / "DONE").read_text())
    assert spy.start[str(plan["student-1"].path)] != state_hash(new_model(run).state_dict())
    # continual: student t starts from teacher t-1's best checkpoint, which labeled its round
    for t, teacher in ((1, "supervised"), (2, "student-1")):
        assert spy.start[str(plan[f"student-{t}"].path)] == best_hash(plan[teacher].path)
        checkpoint = plan[f"label-{t}"].round().provenance["checkpoint"]["path"]
        assert checkpoint.startswith(str(plan[teacher].path))
    run_s, plan_s = runs["stso"]
    for t in (1, 2):
        assert spy.start[str(plan_s[f"student-{t}"].path)] == state_hash(new_model(run_s).state_dict())
    # the same teacher M0 (deterministic training) labels generation 1 identically in both methods
    r_sl, r_st = load_round(plan["label-1"].path), load_round(plan_s["label-1"].path)
    assert all(np.array_equal(r_sl.labels(s), r_st.labels(s)) for s in r_sl.stems)


# ----------------------------------------------------------------------------- resume after SIGKILL
RUNNER_OPTIONS = {"ratios": [0.5, 1.0], "round_steps": 12}


def main(out: str) -> None:
    """Subprocess entry: run (or continue) a tiny DST-CBC run in ``out``."""
    torch.set_num_threads(1)
    _, method = synthetic_run(Path(out), "dst-cbc", RUNNER_OPTIONS, steps=6, n=40,
                              data_dir=Path(out).parent / "data")
    execute(method, Path(out))
    torch.save(method.final_model().state_dict(), Path(out) / "final.pt")


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.methods.test_dst_cbc_atso", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_resume_mid_round_after_sigkill_equals_uninterrupted(tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"  # separate out_dirs: no stage reuse between them
    proc = _start(whole)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    proc = _start(broken)
    round_dir = broken / "run" / "stages" / "2-round-1"
    deadline = time.time() + 600
    while not (round_dir / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before round 1 checkpointed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (round_dir / "DONE").exists()  # killed in the middle of the round
    proc = _start(broken)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    a, b = torch.load(whole / "final.pt"), torch.load(broken / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for stage in ("2-round-1", "4-round-2"):
        assert (whole / "run/stages" / stage / "metrics.jsonl").read_text() == \
            (broken / "run/stages" / stage / "metrics.jsonl").read_text()
    r_a, r_b = load_round(whole / "run/stages/3-cbc-2"), load_round(broken / "run/stages/3-cbc-2")
    assert all(np.array_equal(r_a.labels(s), r_b.labels(s)) for s in r_a.stems)


if __name__ == "__main__":
    main(sys.argv[1])


def test_generation_students_learn_the_strong_view_of_flip_fused_labels(tmp_path: Path) -> None:
    """The ATSO family's defaults (issue 25): labels fuse the image and its flip, and a student's pseudo-labeled
    items are ST++'s strong view (cutout pixels ignored), never the weak view its teacher labelled."""
    torch.set_num_threads(1)
    run, method = synthetic_run(tmp_path, "stso", {"generations": 1, "generation_steps": 2})
    execute(method, tmp_path)
    labels = method.pipeline["label-1"]
    assert method.stages()[1].key["variant"]["tta_flip"] is True
    stems = labels.round().stems
    ds = student_loader(run, [(labels, stems)], 0, strong=method.options.strong_aug).dataset
    item, raw = ds[ds.n_labeled], ds.pseudo[0]  # the first pseudo-labeled item
    assert item["pseudo"] == 1 and torch.equal(item["image"], raw["image_strong"])
    assert not torch.equal(item["image"], raw["image"]) and torch.equal(item["mask"], raw["mask_strong"])
    plain = type(method)(run, method.options.model_copy(update={"strong_aug": False}))
    item = student_loader(run, [(labels, stems)], 0, strong=plain.options.strong_aug).dataset[ds.n_labeled]
    assert torch.equal(item["image"], raw["image"])
