"""Online teacher methods (mean-teacher, momentum-pl, gta-seg): each step does what its algorithm box says.

The tasks are driven directly with a tiny BatchNorm net (named like an smp model) and in-memory arrays, so
every check is exact: EMA scopes, step order, what the loss receives, which net labels, which net moves.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import TrainConfig
from semiseg.data.datasets import SegmentationDataset, oversampled_indices
from semiseg.data.transforms import StrongTransform, cutmix_batch
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.trainer import Trainer
from semiseg.losses import LABELED_LOSSES
from semiseg.methods import gta_seg
from semiseg.methods.gta_seg import GTASegOptions, GTATask
from semiseg.methods.mean_teacher import MeanTeacherOptions, MeanTeacherTask
from semiseg.methods.momentum_pl import MomentumPLOptions, StudentTask, TeacherTask
from semiseg.methods.online import hard_pseudo_labels, ignore_maps
from semiseg.methods.schedules import retaining_momentum
from semiseg.models.factory import param_group_of
from semiseg.pipeline.plan import StageInputs


class TinySeg(nn.Module):
    """encoder / decoder / segmentation_head with BatchNorm, like an smp model's parameter names."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.decoder = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.segmentation_head = nn.Conv2d(6, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))


def arrays(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return images, (images[..., 0] > 128).astype(np.uint8)


def streams(n_lab: int = 4, n_unl: int = 8, batch: int = 2, *, strong: bool = False,
            repeat: bool = False) -> tuple[EndlessLoader, EndlessLoader]:
    images, masks = arrays(n_lab, 1)
    idx = oversampled_indices(range(n_lab), n_unl) if repeat else range(n_lab)
    lab = EndlessLoader(SegmentationDataset(images, masks, idx, None, seed=3), batch, seed=3)
    u_images, _ = arrays(n_unl, 2)
    strong_t = StrongTransform(p_cutout=1.0) if strong else None
    unl = EndlessLoader(SegmentationDataset(u_images, ignore_maps(u_images), range(n_unl), None, strong=strong_t,
                                            seed=4), batch, seed=4)
    return lab, unl


def trainer_for(task, tmp_path, lr: float = 0.05) -> Trainer:
    train = TrainConfig(steps=1000, lr=lr, optimizer="sgd", progress=False, amp="none", lr_scaling="none")
    return Trainer(task, train, tmp_path, device=torch.device("cpu"))


def params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def peek(loader: EndlessLoader) -> dict:
    """The batch ``loader`` will give next, without advancing it."""
    twin = EndlessLoader(loader.dataset, loader.batch_size, seed=loader.seed)
    twin.load_state_dict(loader.state_dict())
    return next(twin)


def run_steps(trainer: Trainer, n: int, optimize=None) -> list[dict[str, float]]:
    """The Trainer's loop body (step, hooks, epoch-end calls) without validation or checkpoints; ``optimize``
    replaces the optimizer step."""
    real = trainer.optimize
    trainer.optimize = optimize or real
    try:
        return [trainer.run_step({k: next(ld) for k, ld in trainer.task.loaders.items()}) for _ in range(n)]
    finally:
        trainer.optimize = real


# ------------------------------------------------------------------------------------------------ GTA
def gta(tmp_path, **options):
    torch.manual_seed(0)
    lab, unl = streams(repeat=True)  # 4 labeled oversampled to 8: an epoch is 4 steps of batch 2
    # the released schedule (one supervised epoch, uncapped EMA), so the hand values below are the code's
    released = {"sup_only_epochs": 1, "ema_horizon": None}
    task = GTATask(TinySeg(), lab, unl, StageInputs("gta-seg", GTASegOptions(**{**released, **options}), 1000), seed=5)
    return task, trainer_for(task, tmp_path)


class Spy:
    """Records, at each optimizer call, the name and every net's parameters just before the step."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.events, self.optimize = trainer, [], trainer.optimize

    def __call__(self, name: str, loss: torch.Tensor) -> None:
        self.events.append((name, {k: params(v) for k, v in self.trainer.task.nets.items()}))
        self.optimize(name, loss)


def test_gta_supervised_epoch_then_copy(tmp_path):
    task, trainer = gta(tmp_path)
    assert task.sup_steps == 4
    teacher0, ta0 = params(task.nets["teacher"]), params(task.nets["ta"])
    spy = Spy(trainer)
    run_steps(trainer, 4, spy)
    assert [name for name, _ in spy.events] == ["student"] * 4
    assert task.eval_net() is task.nets["student"]  # the code validates the student in epoch 0
    for k, v in params(task.nets["teacher"]).items():
        assert torch.equal(v, teacher0[k]) and torch.equal(params(task.nets["ta"])[k], ta0[k])
    student = copy.deepcopy(task.nets["student"])
    task.start_semi_supervised(4)  # one deep copy: parameters and BN statistics
    for name in ("ta", "teacher"):
        for k, v in student.state_dict().items():
            assert torch.equal(task.nets[name].state_dict()[k], v), (name, k)
    run_steps(trainer, 1, spy)
    assert task.eval_net() is task.nets["teacher"]
    name, before = spy.events[4]  # the TA step of the first semi-supervised step sees the copies
    assert name == "ta"
    for k, v in student.named_parameters():
        assert torch.equal(before["ta"][k], v) and torch.equal(before["teacher"][k], v)


@pytest.mark.parametrize("scope,moved", [("all_but_classifier", {"encoder", "decoder"}), ("encoder", {"encoder"})])
def test_gta_step_order_and_ta_to_student_scope(tmp_path, scope, moved):
    """One semi step: TA step, EMA TA -> student on `scope` only, student step, EMA student -> teacher."""
    task, trainer = gta(tmp_path, ta_to_student_scope=scope)
    run_steps(trainer, 4)
    spy = Spy(trainer)
    run_steps(trainer, 2, spy)
    assert [name for name, _ in spy.events] == ["ta", "student", "ta", "student"]
    # step t = 0: decay 0, so the student takes the stepped TA's values exactly inside the scope
    (_, at_ta), (_, at_student) = spy.events[0], spy.events[1]
    for k, v in at_student["student"].items():
        if param_group_of(k) in moved:
            assert torch.equal(v, at_student["ta"][k]), k
            assert not torch.equal(v, at_ta["student"][k]), k
        else:
            assert torch.equal(v, at_ta["student"][k]), k  # untouched by the TA
    # step t = 1: decay 1/2 on the scope, the student's own values elsewhere
    (_, at_ta), (_, at_student) = spy.events[2], spy.events[3]
    ta_after = at_student["ta"]
    for k, v in at_student["student"].items():
        expected = 0.5 * at_ta["student"][k] + 0.5 * ta_after[k] if param_group_of(k) in moved else at_ta["student"][k]
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    # the teacher follows the student: t = 1 -> teacher = (teacher_prev + student_now) / 2
    now = params(task.nets["student"])
    for k, v in params(task.nets["teacher"]).items():
        torch.testing.assert_close(v, 0.5 * at_ta["teacher"][k] + 0.5 * now[k], rtol=0, atol=1e-6)


def test_gta_default_transfers_exactly_the_encoder_of_an_smp_unet():
    """Paper Eq. 9: the TA hands the student its feature extractor only. On an smp Unet the code's scope (all
    but the 3x3 segmentation head) would move the decoder too: the paper's worst row (Table 5)."""
    from semiseg.config import ModelConfig
    from semiseg.models.factory import build_model

    torch.manual_seed(0)
    student = build_model(ModelConfig(encoder="efficientnet-lite0", weights="none"), 2)
    lab, unl = streams(repeat=True)
    task = GTATask(student, lab, unl, StageInputs("gta-seg", GTASegOptions(), 100), seed=5)
    with torch.no_grad():
        for p in task.nets["ta"].parameters():
            p.add_(1.0)
    before = params(student)
    task.ta_to_student.update(0)  # decay 0: every parameter in scope takes the TA's value
    after = params(student)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == {k for k in after if k.startswith("encoder.")}
    assert any(k.startswith("decoder.") for k in after) and not any(k.startswith("decoder.") for k in moved)


def _hand_gta_loss(logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor, drop: float) -> float:
    """GTA's loss by hand in numpy: drop c <= 20th percentile, weights (c + 1) over all pixels."""
    c = teacher.double().softmax(1).amax(1).numpy()
    thresh = np.percentile(c, drop)
    kept = c > thresh
    logp = torch.log_softmax(logits.double(), 1).numpy()
    ce = -np.take_along_axis(logp, target.numpy()[:, None], 1)[:, 0]
    w = np.where(kept, c, 0.0) + 1.0
    return float((w * ce * kept).sum() / w.sum())


@pytest.mark.parametrize("cutmix_p", [0.0, 1.0])
def test_gta_ta_loss_gets_eval_labels_and_train_mode_confidence(tmp_path, monkeypatch, cutmix_p):
    task, trainer = gta(tmp_path, cutmix_p=cutmix_p)
    run_steps(trainer, 5)  # past the copy
    seen = {}
    real = gta_seg.pseudo_label_loss

    def spy(logits, target, teacher_logits, selection, weighting):
        seen.update(logits=logits.detach().clone(), target=target.clone(), teacher=teacher_logits.clone(),
                    kw={**selection.params(), **weighting.params()})
        return real(logits, target, teacher_logits, selection, weighting)

    monkeypatch.setattr(gta_seg, "pseudo_label_loss", spy)
    lb, ub = peek(task.loaders["labeled"]), peek(task.loaders["unlabeled"])
    teacher = copy.deepcopy(task.nets["teacher"])
    gen = torch.Generator()
    gen.set_state(task.generator.get_state())
    out = run_steps(trainer, 1)[0]
    with torch.no_grad():
        label, conf = hard_pseudo_labels(teacher.eval()(ub["image"]))
        image_u, label, _ = cutmix_batch(ub["image"], label, conf, p=cutmix_p, generator=gen)
        conf_logits = teacher.train()(torch.cat([lb["image"], image_u]))[2:]
    assert torch.equal(seen["target"], label)
    assert cutmix_p == 0.0 or not torch.equal(image_u, ub["image"])
    torch.testing.assert_close(seen["teacher"], conf_logits)
    assert seen["kw"] == {"percent": 20.0, "sample_stride": 1, "threshold": None, "tau": None,
                          "ignored_count_as_dropped": False}
    hand = _hand_gta_loss(seen["logits"], seen["target"], seen["teacher"], 20.0)
    assert out["loss_ta"] == pytest.approx(hand, rel=1e-5)


def test_gta_legacy_aliasing_ties_storage_and_keeps_the_classifier_tied(tmp_path):
    task, trainer = gta(tmp_path, legacy_weight_aliasing=True)
    run_steps(trainer, 5)
    s, ta = task.nets["student"], task.nets["ta"]
    # after a step of the first semi epoch: the classifier is shared, the EMA re-assigned the rest
    assert s.segmentation_head.weight.data_ptr() == ta.segmentation_head.weight.data_ptr()
    assert s.encoder[0].weight.data_ptr() != ta.encoder[0].weight.data_ptr()
    run_steps(trainer, 5)  # into the second semi epoch: the code never unties the classifier
    assert s.segmentation_head.weight.data_ptr() == ta.segmentation_head.weight.data_ptr()
    # a resumed task restores the tie
    twin, _ = gta(tmp_path / "b", legacy_weight_aliasing=True)
    for name in task.nets:
        twin.nets[name].load_state_dict(task.nets[name].state_dict())
    twin.load_state_dict(task.state_dict())
    assert twin.nets["student"].segmentation_head.weight.data_ptr() == \
        twin.nets["ta"].segmentation_head.weight.data_ptr()
    # without the legacy option nothing is ever shared
    clean, trainer = gta(tmp_path / "c")
    run_steps(trainer, 10)
    shared = {p.data_ptr() for p in clean.nets["student"].parameters()} & \
        {p.data_ptr() for n in ("ta", "teacher") for p in clean.nets[n].parameters()}
    assert not shared


# ------------------------------------------------------------------------------------------ mean teacher
def test_mean_teacher_pseudo_labels_ignore_cutout_and_low_confidence(tmp_path):
    torch.manual_seed(0)
    lab, unl = streams(strong=True)
    task = MeanTeacherTask(TinySeg(), lab, unl, StageInputs("mean-teacher", MeanTeacherOptions(conf_threshold=0), 1000))
    batch = next(unl)
    box = batch["mask_strong"] == 255
    assert box.any() and not box.all()
    pseudo = task.pseudo_labels(batch)
    with torch.no_grad():
        expected = task.nets["teacher"].eval()(batch["image"]).argmax(1)  # the WEAK view, eval mode
    assert torch.equal(pseudo == 255, box)
    assert torch.equal(pseudo[~box], expected[~box])
    task.opt = MeanTeacherOptions(conf_threshold=0.55)
    with torch.no_grad():
        conf = task.nets["teacher"](batch["image"]).softmax(1).amax(1)
    assert torch.equal(task.pseudo_labels(batch) == 255, box | (conf < 0.55))


def test_mean_teacher_ema_warmup_and_student_view(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lab, unl = streams(strong=True)
    plain = MeanTeacherOptions(sup_warmup=0, rampup=0, conf_threshold=0, ema_horizon=None)  # from step 0
    task = MeanTeacherTask(TinySeg(), lab, unl, StageInputs("mean-teacher", plain, 1000))
    trainer = trainer_for(task, tmp_path)
    inputs = []
    task.nets["student"].register_forward_hook(lambda m, i, o: inputs.append(i[0].clone()))
    ub = peek(unl)
    out = run_steps(trainer, 1)[0]
    assert out["ema_decay"] == 0.0  # min(1 - 1/1, 0.99)
    assert torch.equal(inputs[0][2:], ub["image_strong"])
    for k, v in task.nets["student"].state_dict().items():  # decay 0 copies parameters and buffers
        assert torch.equal(task.nets["teacher"].state_dict()[k], v), k
    before_t = params(task.nets["teacher"])
    run_steps(trainer, 1)
    s_after = params(task.nets["student"])
    for k, v in params(task.nets["teacher"]).items():  # t = 1: decay 1/2
        torch.testing.assert_close(v, 0.5 * before_t[k] + 0.5 * s_after[k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- momentum-pl
def test_momentum_teacher_stage_ema_per_epoch_and_bn_by_forward(tmp_path):
    torch.manual_seed(0)
    lab, _ = streams(n_lab=6)  # 3 steps per epoch
    task = TeacherTask(TinySeg(), lab, StageInputs("teacher", MomentumPLOptions(**MOMENTUM_RELEASED), 1000))
    trainer = trainer_for(task, tmp_path)
    m0 = params(task.nets["momentum"])
    bn0 = task.nets["momentum"].encoder[1].running_mean.clone()
    run_steps(trainer, 2)
    for k, v in params(task.nets["momentum"]).items():
        assert torch.equal(v, m0[k])  # no EMA inside an epoch
    assert not torch.equal(task.nets["momentum"].encoder[1].running_mean, bn0)  # the logging forward
    run_steps(trainer, 1)
    model = params(task.nets["model"])
    for k, v in params(task.nets["momentum"]).items():
        torch.testing.assert_close(v, 0.95 * m0[k] + 0.05 * model[k], rtol=0, atol=1e-6)
    assert set(task.extra_eval_nets()) == {"momentum"}


def student_task(tmp_path, **options):
    torch.manual_seed(0)
    lab, unl = streams(n_lab=4, n_unl=6)  # the unlabeled stream (3 steps) defines the epoch
    teacher = TinySeg()
    task = StudentTask(TinySeg(), teacher, lab, unl,
                       StageInputs("student", MomentumPLOptions(**{**MOMENTUM_RELEASED, **options}), 1000))
    return task, trainer_for(task, tmp_path)


# the code's schedule and views: the hand values below are its
MOMENTUM_RELEASED = {"ema_every": "epoch", "ema_horizon": None, "teacher_view": "student", "teacher_retain": None,
                     "labeled_loss": "same"}


def test_momentum_pl_clean_teacher_labels_the_unnoised_view_in_eval_mode(tmp_path):
    """The default (paper III-B2): the teacher labels the shared clean view in eval mode, the student learns
    those labels on its noised copy, never on the view the teacher saw."""
    torch.manual_seed(0)
    lab, unl = streams(n_lab=4, n_unl=6, strong=True)
    task = StudentTask(TinySeg(), TinySeg(), lab, unl, StageInputs("student", MomentumPLOptions(), 100))
    trainer = trainer_for(task, tmp_path)
    batch = peek(task.loaders["unlabeled"])
    assert not torch.equal(batch["image"], batch["image_strong"])
    teacher_in, student_in, modes = [], [], []

    def see_teacher(module, inputs, output) -> None:
        teacher_in.append(inputs[0].clone())
        modes.append(module.training)

    task.nets["teacher"].register_forward_hook(see_teacher)
    task.nets["student"].register_forward_hook(lambda m, i, o: student_in.append(i[0].clone()))
    run_steps(trainer, 1)
    assert torch.equal(teacher_in[0], batch["image"]) and modes[0] is False
    assert torch.equal(student_in[1], batch["image_strong"])  # [labeled, unlabeled]: the noised copy
    assert not any(torch.equal(x, batch["image"]) for x in student_in)


def test_momentum_pl_online_teacher_keeps_its_share_of_the_stage1_teacher(tmp_path):
    """teacher_retain: after a whole stage of per-step updates the stage-1 teacher is that share of the online
    teacher, whatever the number of steps (at the code's 0.99 per step it would be 0.99^steps)."""
    for steps in (10, 10_000):
        d = retaining_momentum(0.5, steps)
        assert d ** steps == pytest.approx(0.5)
    torch.manual_seed(0)
    lab, unl = streams(n_lab=4, n_unl=6, strong=True)
    task = StudentTask(TinySeg(), TinySeg(), lab, unl, StageInputs("student", MomentumPLOptions(teacher_retain=0.5), 6))
    trainer = trainer_for(task, tmp_path)
    t0 = params(task.nets["teacher"])
    with torch.no_grad():  # a student pinned at zero makes the teacher's share readable: t_U = d^U t_0
        for p in task.nets["student"].parameters():
            p.zero_()
    run_steps(trainer, 6, optimize=lambda name, loss: None)
    for k, v in params(task.nets["teacher"]).items():
        torch.testing.assert_close(v, 0.5 * t0[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cross-entropy", "dice", "cross-entropy+dice"])
def test_momentum_pl_labeled_loss_is_the_named_loss_in_both_stages(tmp_path, name):
    torch.manual_seed(0)
    lab, unl = streams(n_lab=4, n_unl=6, strong=True)
    options = MomentumPLOptions(labeled_loss=name)
    batch = peek(lab)
    task = TeacherTask(TinySeg(), lab, StageInputs("teacher", options, 10))
    expected = LABELED_LOSSES[name](task.nets["model"](batch["image"]), batch["mask"]).item()
    logs = run_steps(trainer_for(task, tmp_path / "t"), 1)
    assert logs[0]["loss"] == pytest.approx(expected, rel=1e-5)
    student = StudentTask(TinySeg(), TinySeg(), lab, unl, StageInputs("student", options, 10))
    batch = peek(lab)
    expected = LABELED_LOSSES[name](student.nets["student"](batch["image"]), batch["mask"]).item()
    logs = run_steps(trainer_for(student, tmp_path / "s"), 1)
    assert logs[0]["loss_labeled"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("cadence", ["epoch", "step"])
def test_momentum_pl_offline_teacher_never_moves_online_follows_the_student(tmp_path, cadence):
    off, off_trainer = student_task(tmp_path / "off", teacher_update="offline", ema_every=cadence)
    on, on_trainer = student_task(tmp_path / "on", teacher_update="online", ema_every=cadence)
    assert list(on.loaders) == ["unlabeled", "labeled"]
    t0 = params(off.nets["teacher"])
    for _ in range(4):
        run_steps(off_trainer, 1)
        for k, v in params(off.nets["teacher"]).items():
            assert torch.equal(v, t0[k]), k
    before = params(on.nets["teacher"])
    run_steps(on_trainer, 2)
    moved = any(not torch.equal(v, before[k]) for k, v in params(on.nets["teacher"]).items())
    assert moved == (cadence == "step")
    run_steps(on_trainer, 1)  # end of the first epoch
    assert any(not torch.equal(v, before[k]) for k, v in params(on.nets["teacher"]).items())
    # both variants run identical student updates until the teacher first differs
    assert set(off.extra_eval_nets()) == {"student"} and set(on.extra_eval_nets()) == {"student", "teacher"}


def test_momentum_pl_teacher_online_ema_formula_per_epoch(tmp_path):
    task, trainer = student_task(tmp_path)
    t0, m0 = params(task.nets["teacher"]), params(task.nets["momentum"])
    run_steps(trainer, 3)
    s = params(task.nets["student"])
    for k, v in params(task.nets["teacher"]).items():
        torch.testing.assert_close(v, 0.99 * t0[k] + 0.01 * s[k], rtol=0, atol=1e-6)
    for k, v in params(task.nets["momentum"]).items():
        torch.testing.assert_close(v, 0.99 * m0[k] + 0.01 * s[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("soft,mode", [(True, "train"), (False, "eval")])
def test_momentum_pl_pseudo_targets_on_the_students_view(tmp_path, soft, mode):
    task, trainer = student_task(tmp_path, soft_labels=soft, teacher_mode=mode)
    images = peek(task.loaders["unlabeled"])["image"]
    ref = copy.deepcopy(task.nets["teacher"]).train(mode == "train")
    hard, soft_t = task.pseudo_targets(images)
    assert task.nets["teacher"].training  # mode restored
    with torch.no_grad():
        prob = ref(images).softmax(1)
    if soft:
        assert hard is None
        torch.testing.assert_close(soft_t, prob[:, 1])
    else:
        assert soft_t is None and torch.equal(hard, prob.argmax(1))
    # the unlabeled loss is taken on the same images the teacher labelled
    seen = []
    task.nets["student"].register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    ub = peek(task.loaders["unlabeled"])
    run_steps(trainer, 1)
    assert torch.equal(seen[1], ub["image"])


def test_dice_loss_of_soft_pseudo_labels_matches_hand_value():
    """The unlabeled loss with soft targets: 1 - 2Σpt / (Σp + Σt) over the whole batch (foreground)."""
    from semiseg.losses import overlap_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, generator=g)
    soft = torch.rand(2, 4, 4, generator=g)
    p = F.softmax(logits, 1)[:, 1]
    hand = 1 - 2 * (p * soft).sum() / (p.sum() + soft.sum())
    torch.testing.assert_close(overlap_loss("dice")(logits, None, soft), hand)
    torch.testing.assert_close(overlap_loss("tversky")(logits, None, soft), hand)  # alpha = beta = 0.5: Dice
    with pytest.raises(ValueError, match="unknown overlap loss 'jaccard'"):
        overlap_loss("jaccard")


# ------------------------------------------------------------------------------- end to end (real CLI)
def _last(run_dir, stage):
    return torch.load(run_dir / "stages" / stage / "checkpoints" / "last.pt", weights_only=False)


KILLED = "killed-runs"  # an out_dir of its own: a run beside the straight one would reuse its finished stages


def _kill_and_resume(tmp_path, name: str, extra: list[str], stage: str, at_step: int) -> None:
    """Start a run in ``tmp_path/KILLED``, SIGKILL it once ``stage`` checkpointed ``at_step``, then ``semiseg
    resume`` it."""
    import signal
    import subprocess
    import sys
    import time

    from tests.cli_helpers import env, semiseg, train_args

    cmd = [sys.executable, "-m", "semiseg", *train_args(name, tmp_path / KILLED, extra)]
    proc = subprocess.Popen(cmd, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / KILLED / name / "stages" / stage / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["step"] >= at_step:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / KILLED / name / "results.json").exists()
    semiseg(["resume", str(tmp_path / KILLED / name)], tmp_path)


def _assert_same_run(a, b, stages: list[str]) -> None:
    import json

    for stage in stages:
        sa, sb = _last(a, stage), _last(b, stage)
        assert sa["step"] == sb["step"] and sa["best"] == sb["best"] and sa.get("best_extra") == sb.get("best_extra")
        for net in sa["nets"]:  # students, teachers, TA, momentum copies: parameters and BN statistics
            for k, v in sa["nets"][net].items():
                assert torch.equal(v, sb["nets"][net][k]), (stage, net, k)
        assert sa["task"].keys() == sb["task"].keys()
        for k, v in sa["task"].items():
            assert torch.equal(v, sb["task"][k]) if isinstance(v, torch.Tensor) else v == sb["task"][k], k
        log = Path("stages") / stage / "metrics.jsonl"
        assert (a / log).read_text() == (b / log).read_text()
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["val"] == rb["val"] and ra["test"]["dice"] == rb["test"]["dice"]


DETERMINISTIC = ["train.deterministic=true", "train.checkpoint_every=4", "train.eval_every=8", "train.steps=24"]


@pytest.mark.slow
def test_gta_seg_sigkill_resume_equals_uninterrupted(tmp_path):
    """Killed after the student -> teacher/TA copy; teacher, TA, student, CutMix generator all resume."""
    from tests.cli_helpers import semiseg, train_args

    extra = [*DETERMINISTIC, "method.name=gta-seg"]
    semiseg(train_args("straight", tmp_path / "runs", extra), tmp_path)
    _kill_and_resume(tmp_path, "killed", extra, "0-gta-seg", at_step=12)
    _assert_same_run(tmp_path / "runs" / "straight", tmp_path / KILLED / "killed", ["0-gta-seg"])


@pytest.mark.slow
def test_momentum_pl_sigkill_resume_equals_uninterrupted(tmp_path):
    """Killed inside the student stage (teacher stage DONE); per-epoch EMAs and the online teacher resume.
    Offline variant afterwards: its teacher stage is reused, and its frozen teacher is exactly the stage-1
    best momentum net (raw: best raw net)."""
    from tests.cli_helpers import semiseg, train_args

    extra = [*DETERMINISTIC, "method.name=momentum-pl", "train.batch_size=2"]
    semiseg(train_args("straight", tmp_path / "runs", extra), tmp_path)
    _kill_and_resume(tmp_path, "killed", extra, "1-student", at_step=12)
    stages = ["0-teacher", "1-student"]
    _assert_same_run(tmp_path / "runs" / "straight", tmp_path / KILLED / "killed", stages)
    for pseudo, best in [("momentum", "best-momentum.pt"), ("raw", "best.pt")]:
        name = f"offline-{pseudo}"
        variant = [*extra, "method.teacher_update=offline", f"method.pseudo_from={pseudo}",
                   "method.teacher_steps=24", "train.steps=4"]
        proc = semiseg(train_args(name, tmp_path / "runs", variant), tmp_path)
        assert "reused" in proc.stdout + proc.stderr  # same teacher stage as the runs above
        run = tmp_path / "runs" / name
        selected = torch.load(run / "stages" / "0-teacher" / "checkpoints" / best, weights_only=False)["net"]
        teacher = _last(run, "1-student")["nets"]["teacher"]
        for k, v in teacher.items():
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # train-mode labelling
                assert torch.equal(v, selected[k]), (pseudo, k)
