"""``ensemble-st``: ST++'s stages shared with an ``st++`` run, UniMatch's with a ``unimatch`` run, then one round
labelled by both teachers' mean probabilities and a student from scratch on it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.models.ensemble import MeanProbabilities
from semiseg.pipeline.labeling import make_labeler
from semiseg.pipeline.stages import run_stages
from tests.methods.test_self_training import STPP_STAGES, one_thread, synthetic_run  # noqa: F401

STPP = {"retrain_steps": 4, "tta_scales": [1.0], "tta_flip": False}


class Fixed(nn.Module):
    """A "network" whose logits are a constant map."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, *x.shape[2:])


def test_mean_probabilities_by_hand() -> None:
    a, b = Fixed([0.0, 0.0]), Fixed([np.log(3.0), 0.0])  # softmax (0.5, 0.5) and (0.75, 0.25)
    out = MeanProbabilities([a, b])(torch.zeros(2, 3, 4, 4))
    assert out.shape == (2, 2, 4, 4)
    assert torch.allclose(out.softmax(1)[0, :, 0, 0], torch.tensor([0.625, 0.375]))
    # a confident member outvotes an unsure one: argmax follows the mean, not the count of votes
    c = Fixed([0.0, np.log(1.5)])  # (0.4, 0.6): votes class 1, weakly
    d = Fixed([np.log(9.0), 0.0])  # (0.9, 0.1): votes class 0, strongly
    e = Fixed([0.0, np.log(1.5)])
    assert MeanProbabilities([c, d, e])(torch.zeros(1, 3, 1, 1)).argmax(1).item() == 0  # mean (0.57, 0.43)
    with pytest.raises(ValueError, match="at least one"):
        MeanProbabilities([])


def test_plan_shares_the_stages_of_st_plus_plus_and_of_unimatch(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    _, pp = synthetic_run(data, out, "pp", "st++", **STPP)
    _, um = synthetic_run(data, out, "um", "unimatch")
    _, es = synthetic_run(data, out, "es", "ensemble-st", **STPP)
    names = [s.name for s in es.stages()]
    assert names == [n.split("-", 1)[1] for n in STPP_STAGES] + ["unimatch", "label-ensemble", "retrain-ensemble",
                                                                 "diagnostics"]
    # one out_dir trains ST++'s stages once for st++ and ensemble-st, and UniMatch's once for unimatch and it
    assert [s.key_hash() for s in es.stages()[:6]] == [s.key_hash() for s in pp.stages()[:6]]
    assert es.stages()[6].key_hash() == um.stages()[0].key_hash()
    # the final student starts from scratch and trains as long as ST++'s: the same control as st++
    assert es.trained_steps() == pp.trained_steps() == 4
    # a UniMatch option changes the UniMatch stage and what follows it, never ST++'s stages
    _, other = synthetic_run(data, out, "x", "ensemble-st", fp_weight=0.0, **STPP)
    assert [a.key_hash() == b.key_hash() for a, b in zip(es.stages()[:9], other.stages()[:9], strict=True)] == \
        [True] * 6 + [False] * 3
    # a second round re-labels with the newest student beside U; the first round's stages stay reusable
    _, two = synthetic_run(data, out, "two", "ensemble-st", ensemble_rounds=2, **STPP)
    stages = two.stages()
    assert [s.name for s in stages][7:] == ["label-ensemble", "retrain-ensemble", "label-ensemble-2",
                                            "retrain-ensemble-2", "diagnostics"]
    assert [s.key_hash() for s in stages[:9]] == [s.key_hash() for s in es.stages()[:9]]
    teachers = set(stages[9].key["inputs"])
    assert {stages[8].key_hash(), stages[6].key_hash()} <= teachers and stages[5].key_hash() not in teachers
    assert two.trained_steps() == 4  # the last student from scratch: the same control
    # CutMix in the ensemble student keys its stage only; off, no key holds it, so the stages of
    # runs from before the option existed are still read back
    _, mixed = synthetic_run(data, out, "mix", "ensemble-st", student_cutmix=0.5, **STPP)
    assert [a.key_hash() == b.key_hash() for a, b in zip(es.stages()[:9], mixed.stages()[:9], strict=True)] == \
        [True] * 8 + [False]
    assert mixed.stages()[8].key["variant"]["cutmix_p"] == 0.5 and "cutmix_p" not in es.stages()[8].key["variant"]


def test_the_cutmix_student_pastes_the_next_images_box_with_its_label() -> None:
    from semiseg.engine.task import StepContext
    from semiseg.methods.offline import CutMixStudentTask

    seen: dict[str, torch.Tensor] = {}

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["image"] = x
            return torch.zeros(x.shape[0], 2, *x.shape[2:]) + self.w

    def loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen["mask"] = mask
        return logits.sum()

    b, h, w = 4, 16, 16
    image = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    mask = torch.arange(b).view(b, 1, 1).expand(b, h, w).clone()
    batch = {"labeled": {"image": image, "mask": mask, "pseudo": torch.tensor([0, 1, 0, 1])}}

    def step(task: CutMixStudentTask, at: int) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        ctx = StepContext(at, torch.device("cpu"), contextlib.nullcontext, lambda name, value: None, total_steps=10)
        return task.train_step(batch, ctx), seen["image"].clone(), seen["mask"].clone()

    task = CutMixStudentTask(Recorder(), None, loss=loss, p=1.0, seed=7)
    logs, mixed, labels = step(task, 3)
    for i in range(b):
        box = mixed[i, 0] != i  # where image i shows another image
        assert box.any() and not box.all()  # every image gets one box (p = 1), never the whole image
        assert (mixed[i, 0][box] == (i + 1) % b).all()  # the next image of the batch
        assert torch.equal(labels[i] != i, box)  # and its label with it, pixel for pixel
    assert 0 < logs["cutmix_share"] < 1 and logs["pseudo_share"] == 0.5
    assert torch.equal(image, batch["labeled"]["image"])  # the loader's batch is left as it was
    # the boxes are a pure function of (seed, rank, step): a resumed run replays them, another step draws others
    assert torch.equal(step(CutMixStudentTask(Recorder(), None, loss=loss, p=1.0, seed=7), 3)[1], mixed)
    assert not torch.equal(step(task, 4)[1], mixed)
    _, untouched, _ = step(CutMixStudentTask(Recorder(), None, loss=loss, p=0.0, seed=7), 3)
    assert torch.equal(untouched, image)


def test_the_ensemble_round_holds_the_argmax_of_both_teachers_mean(tmp_path: Path,
                                                                    one_thread: None) -> None:  # noqa: F811
    # the student CutMixes its batches (the option's real loop: loader batches, pseudo flags, checkpoints)
    run, es = synthetic_run(tmp_path / "data", tmp_path / "runs", "es", "ensemble-st", steps=8, student_cutmix=0.5,
                            **STPP)
    dirs = run_stages(run.run_dir, es.stages(), out_dir=tmp_path / "runs", log=lambda m: None)
    assert [d.name for d in dirs][-4:] == ["6-unimatch", "7-label-ensemble", "8-retrain-ensemble", "9-diagnostics"]
    refs = es.pipeline.refs
    rnd = refs["label-ensemble"].round()
    assert sorted(rnd.stems) == sorted(run.splits.unlabeled)
    teachers = [refs["retrain-all"].model(), refs["unimatch"].model()]
    images = run.arrays("unlabeled").images
    each = [dict(make_labeler(run, t).iter_predictions(images, [0, 1])) for t in teachers]
    stems = run.arrays("unlabeled").stems
    for i in (0, 1):
        mean = ((each[0][i] + each[1][i]) / 2).argmax(0)
        assert np.array_equal(rnd.labels(stems[i]), mean.astype(np.uint8))
        # the two teachers disagree here, and the round is neither one's labels alone
        assert all((mean != one[i].argmax(0)).any() for one in each)
    logged = [json.loads(line) for line in (dirs[8] / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/cutmix_share", 0) > 0 for r in logged)
    final = es.final_model().state_dict()
    best = torch.load(dirs[8] / "checkpoints" / "best.pt", weights_only=False)["net"]
    assert all(torch.equal(final[k], best[k]) for k in best)


def test_the_averaged_student_delivers_its_weights_moving_average_by_hand() -> None:
    from semiseg.engine.task import StepContext
    from semiseg.methods.offline import AveragedStudent
    from semiseg.methods.supervised import SupervisedTask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    task = AveragedStudent(SupervisedTask(model, None), [0.9, 0.5])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def optimize(name: str, loss: torch.Tensor) -> None:
        assert name == "model"  # the raw student is what the loop optimises
        opt.zero_grad()
        loss.backward()
        opt.step()

    batch = {"labeled": {"image": torch.randn(2, 3, 4, 4), "mask": torch.randint(0, 2, (2, 4, 4))}}
    seen = []
    for step in range(3):
        task.train_step(batch, StepContext(step, torch.device("cpu"), contextlib.nullcontext, optimize, 3))
        logs = {}
        for hook in task.hooks:
            logs.update(hook.after_step(step, batch))
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        assert logs == {"average_decay": min(1 - 1 / (step + 1), 0.9)}
    w = "0.weight"
    # warm-up decay d_t = min(1 - 1/(t+1), m): 0, 1/2, 2/3 (m = 0.9) -> the plain mean of the three students
    assert torch.allclose(task.nets["average"].state_dict()[w], (seen[0][w] + seen[1][w] + seen[2][w]) / 3)
    # m = 0.5 caps d at 0.5 from step 1 on: s0/4 + s1/4 + s2/2
    assert torch.allclose(task.nets["average0.5"].state_dict()[w], seen[0][w] / 4 + seen[1][w] / 4 + seen[2][w] / 2)
    # BN statistics are averaged too, so the eval-mode average matches its weights
    rm = "1.running_mean"
    assert torch.allclose(task.nets["average"].state_dict()[rm], sum(s[rm] for s in seen) / 3)
    assert task.eval_net() is task.nets["average"]
    assert task.extra_eval_nets() == {"student": model, "average0.5": task.nets["average0.5"]}
    assert not any(p.requires_grad for p in task.nets["average"].parameters())


def test_the_averaged_student_trains_as_the_raw_one_and_delivers_its_average(
        tmp_path: Path, one_thread: None) -> None:  # noqa: F811
    data, out = tmp_path / "data", tmp_path / "runs"
    _, plain = synthetic_run(data, out, "plain", "ensemble-st", steps=8, **STPP)
    run, avg = synthetic_run(data, out, "avg", "ensemble-st", steps=8, student_average=[0.9, 0.5], **STPP)
    # the option keys the student's stage only; off, no key holds it (older runs' stages are read back)
    assert [a.key_hash() == b.key_hash() for a, b in zip(plain.stages(), avg.stages(), strict=True)][:9] == \
        [True] * 8 + [False]
    assert avg.stages()[8].key["variant"]["weight_averages"] == [0.9, 0.5]
    assert "weight_averages" not in plain.stages()[8].key["variant"]
    assert avg.trained_steps() == plain.trained_steps()  # the same control
    logs = []
    for method in (plain, avg):
        dirs = run_stages(method.run.run_dir, method.stages(), out_dir=out, log=lambda m: None)
        logs.append([json.loads(line) for line in (dirs[8] / "metrics.jsonl").read_text().splitlines()])
    # the averages only watch: the raw student's losses are the plain run's, step for step
    assert [r["train/loss"] for r in logs[0]] == [r["train/loss"] for r in logs[1]]
    validated = [r for r in logs[1] if "val/dice" in r]
    assert validated and all("val_student/dice" in r and "val_average0.5/dice" in r for r in validated)
    assert [r["val_student/dice"] for r in validated] == [r["val/dice"] for r in logs[0] if "val/dice" in r]
    checkpoints = dirs[8] / "checkpoints"
    assert (checkpoints / "best-student.pt").exists() and (checkpoints / "best-average0.5.pt").exists()
    final = avg.final_model().state_dict()
    best = torch.load(checkpoints / "best.pt", weights_only=False)["net"]
    assert all(torch.equal(final[k], best[k]) for k in best)  # the delivered model is the selected average
    with pytest.raises(ValueError, match="distinct and in"):
        synthetic_run(data, out, "bad", "ensemble-st", student_average=[1.0], **STPP)
