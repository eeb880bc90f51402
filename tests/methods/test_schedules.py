"""Budget-proof schedules: each one against hand-computed values, and the methods that use them.

Covers the schedule helpers (EMA momentum cap, sigmoid ramp-up, shares of a stage, ST/ST++'s epoch rule), the
steps each method derives from them (mean-teacher warm-up, GTA-Seg supervised-only phase, momentum-pl's capped
per-step EMA, ST/ST++ re-training, DST-CBC rounds, ``trained_steps``), mean-teacher's warm-up and threshold on
tiny tensors, and a tiny momentum-pl run whose delivered momentum net leaves its initialisation.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from semiseg.api import load_config
from semiseg.methods.gta_seg import GTASegOptions, GTATask, sup_only_steps
from semiseg.methods.mean_teacher import MeanTeacherOptions, MeanTeacherTask
from semiseg.methods.momentum_pl import MomentumPLOptions, TeacherTask
from semiseg.methods.online import hard_pseudo_labels
from semiseg.methods.schedules import (
    batches_per_epoch,
    capped_momentum,
    epoch_rule_steps,
    share_of,
    sigmoid_rampup,
    unlabeled_weight,
)
from semiseg.models.ema import EMA
from semiseg.pipeline.plan import StageInputs, StageRef
from semiseg.pipeline.training import MOVED_WARNING
from tests.method_helpers import method_for
from tests.methods.test_online_methods import TinySeg, params, run_steps, streams, trainer_for


# ------------------------------------------------------------------------------------------ helpers
def test_capped_momentum_by_hand():
    assert capped_momentum(0.99, 400, 0.1) == pytest.approx(1 - 1 / 40)  # 0.975: horizon 40 of 400 steps
    assert capped_momentum(0.99, 1000, 0.1) == pytest.approx(0.99)  # 1 - 1/100 = 0.99: the cap just reaches m
    assert capped_momentum(0.99, 20_000, 0.1) == 0.99  # long stages keep the released momentum
    assert capped_momentum(0.999, 900, 0.1) == pytest.approx(1 - 1 / 90)
    assert capped_momentum(0.99, 3, 0.1) == 0.0  # a horizon under one update: a plain copy
    assert capped_momentum(0.99, 3, None) == 0.99  # the released codes: uncapped


def test_ema_decay_sequence_with_warmup_and_cap():
    # mean-teacher at 400 steps: 40 warm-up steps, 360 semi steps, m = min(0.99, 1 - 1/36)
    net = nn.Linear(1, 1)
    ema = EMA(net, net, momentum=capped_momentum(0.99, 400 - share_of(0.1, 400), 0.1), warmup=True)
    decays = [ema.decay(t) for t in (0, 1, 9, 34, 35, 36, 359)]
    assert decays == pytest.approx([0.0, 0.5, 0.9, 34 / 35, 35 / 36, 35 / 36, 35 / 36])
    # the delivered teacher's weight on the student state of 100 updates ago: 0.9722^100 = 6 %, not 37 %
    assert (35 / 36) ** 100 == pytest.approx(0.0598, abs=1e-4)


def test_sigmoid_rampup_and_unlabeled_weight_by_hand():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))  # exp(-5 * 0.5^2)
    assert sigmoid_rampup(80, 100) == pytest.approx(math.exp(-0.2))  # exp(-5 * 0.2^2)
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0 and sigmoid_rampup(0, 0) == 1.0
    w = [unlabeled_weight(t, warmup_steps=100, rampup_steps=200) for t in (0, 99, 100, 200, 300, 999)]
    assert w == pytest.approx([0.0, 0.0, math.exp(-5), math.exp(-1.25), 1.0, 1.0])
    assert unlabeled_weight(0, warmup_steps=0, rampup_steps=0) == 1.0


def test_shares_and_supervised_only_steps():
    assert [share_of(0.1, n) for n in (300, 400, 1000, 25_000)] == [30, 40, 100, 2500]
    assert share_of(0.05, 30) == 2  # round(1.5): banker's rounding
    assert sup_only_steps(GTASegOptions(), 400, epoch_steps=8) == 40  # 10 % of the stage, not 1 epoch
    assert sup_only_steps(GTASegOptions(sup_only_epochs=1), 400, epoch_steps=147) == 147  # the code: 1 epoch
    assert sup_only_steps(GTASegOptions(sup_only=0.0), 400, epoch_steps=8) == 0


def test_epoch_rule_by_hand():
    # polyp: 65 labeled, 1180 unlabeled, batch 8. Teacher: 1000 steps of 8 batches per epoch = 125 epochs.
    # Re-training set: 65 * ceil(1180 / 65) + 1180 = 65 * 19 + 1180 = 2415 images = 301 batches per epoch.
    assert batches_per_epoch(65, 8) == 8 and batches_per_epoch(2415, 8) == 301 and batches_per_epoch(3, 8) == 1
    assert epoch_rule_steps(1000, 65, 2415, 8) == 37_625  # 125 epochs x 301
    assert epoch_rule_steps(12, 4, 4 * 3 + 10, 2) == 66  # 12 / 2 = 6 epochs x 11 batches


# ------------------------------------------------------------------------------- steps of each method
def test_self_training_retrain_steps_epoch_rule_scale_and_steps():
    # 4 labeled, 10 unlabeled, batch 2, 12 supervised steps = 6 epochs of 2 batches
    st = method_for("self-training")
    assert st.retrain_steps(10) == 66  # set 4 * 3 + 10 = 22 images = 11 batches, x 6 epochs
    assert st.trained_steps() == 66  # the student starts from scratch: its own steps only
    pp = method_for("st++")
    assert pp.retrain_sizes() == [5, 10]
    assert pp.retrain_steps(5) == 6 * 6  # reliable half: 4 * 2 + 5 = 13 images = 6 batches
    assert pp.trained_steps() == 66
    chained = method_for("st++", student_init="teacher")
    assert chained.trained_steps() == 12 + 36 + 66  # fine-tuned all the way from the teacher
    assert method_for("st++", retrain_scale=2).retrain_steps(5) == 24
    assert method_for("st++", retrain_scale=2, retrain_steps=7).retrain_steps(10) == 7


def test_dst_cbc_round_steps_and_the_steps_behind_its_model():
    assert method_for("dst-cbc", steps=1000).round_steps() == 200  # 0.2 x train.steps
    assert method_for("dst-cbc", steps=1000, unlabeled=1180, batch=8, round_epochs=6).round_steps() == 6 * 147
    assert method_for("dst-cbc", steps=1000, round_steps=50, round_epochs=6).round_steps() == 50


@pytest.mark.parametrize("round_metrics, expected", [
    ([0.6, 0.55, 0.7, 0.4, 0.65], 1000 + 200 + 200),  # round 3 wins; it tuned round 1, which tuned the teacher
    ([0.4, 0.3, 0.2, 0.1, 0.45], 1000),  # no round beat the teacher: the teacher is delivered
    ([0.6, 0.7, 0.8, 0.9, 0.95], 1000 + 5 * 200),  # every round improved: the whole chain
])
def test_dst_cbc_trained_steps_follow_the_delivered_lineage(monkeypatch, round_metrics, expected):
    method = method_for("dst-cbc", steps=1000)
    names = [ref.name for ref in method.pipeline.trainings]
    assert names == ["supervised", "round-1", "round-2", "round-3", "round-4", "round-5"]
    metric = dict(zip(names, [0.5, *round_metrics], strict=True))
    monkeypatch.setattr(StageRef, "best_metric", lambda ref: metric[ref.name])
    assert method.trained_steps() == expected


def test_trained_steps_of_the_generation_and_online_methods():
    assert method_for("self-learning", steps=1000, generations=1, generation_steps=500).trained_steps() == 1500
    assert method_for("self-learning", steps=1000, generation_scale=1).trained_steps() == 6000  # 5 continual gens
    # default: the epoch rule, a student sized to its set (4 labeled x 3 + 10 pseudo = 11 batches, 6 epochs)
    assert method_for("stso", generations=1).trained_steps() == 66
    assert method_for("self-learning", generations=2).trained_steps() == 12 + 66 + 66
    assert method_for("stso", generations=1, oversample_labeled=False).trained_steps() == 7 * 6  # 14 images
    atso = method_for("atso", generations=1)  # halves of 5: 4 x 2 + 5 = 13 images = 6 batches; final as stso
    assert [atso.pipeline[n].steps for n in ("student-1A", "student-1B", "final")] == [36, 36, 66]
    assert method_for("stso", steps=1000, generations=3, generation_scale=1).trained_steps() == 1000  # from scratch
    assert method_for("atso", steps=1000, generation_steps=800).trained_steps() == 800
    for name in ("supervised", "mean-teacher", "momentum-pl", "gta-seg", "fixmatch", "unimatch"):
        assert method_for(name, steps=1000).trained_steps() == 1000, name


# ---------------------------------------------------------------------------------------- mean teacher
def test_threshold_mask_on_hand_logits():
    # confidences: softmax([0, 4]) = 0.982, softmax([0, 1]) = 0.731, softmax([3, 0]) = 0.953, 0.5
    logits = torch.tensor([[[0.0, 0.0], [3.0, 0.0]], [[4.0, 1.0], [0.0, 0.0]]]).unsqueeze(0)
    label, conf = hard_pseudo_labels(logits, threshold=0.95)
    assert conf[0].flatten().tolist() == pytest.approx([0.98201, 0.73106, 0.95257, 0.5], abs=1e-5)
    assert label[0].tolist() == [[1, 255], [0, 255]]
    ignore = torch.tensor([[[True, False], [False, False]]])
    assert hard_pseudo_labels(logits, threshold=0.95, ignore=ignore)[0][0].tolist() == [[255, 255], [0, 255]]


def test_mean_teacher_warmup_has_no_unlabeled_loss_then_copies_and_ramps(tmp_path):
    torch.manual_seed(0)
    lab, unl = streams(strong=True)
    opts = MeanTeacherOptions(sup_warmup=0.2, rampup=0.5, ema_horizon=0.5)  # 20 steps: W = 4, R = 10
    task = MeanTeacherTask(TinySeg(), lab, unl, StageInputs("mean-teacher", opts, 20))
    trainer = trainer_for(task, tmp_path)
    assert (task.warmup_steps, task.rampup_steps) == (4, 10)
    assert task.ema.momentum == pytest.approx(1 - 1 / 8)  # min(0.99, 1 - 1/(0.5 * 16))
    seen: list[int] = []
    task.nets["student"].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    teacher0 = params(task.nets["teacher"])
    out = run_steps(trainer, 4)
    assert [o["unlabeled_weight"] for o in out] == [0.0] * 4 and seen == [2] * 4  # labeled images only
    assert all(torch.equal(v, teacher0[k]) for k, v in params(task.nets["teacher"]).items())  # not trained
    assert task.eval_net() is task.nets["student"]  # validated while the teacher is untrained
    student = {k: v.clone() for k, v in task.nets["student"].state_dict().items()}
    calls = []
    real = task.pseudo_labels
    task.pseudo_labels = lambda batch: (calls.append(copy.deepcopy(task.nets["teacher"].state_dict())),
                                        real(batch))[1]
    out = run_steps(trainer, 1)[0]
    for k, v in student.items():  # step W labels with a copy of the warmed-up student (U2PL)
        assert torch.equal(calls[0][k], v), k
    # λ w(t) with the default λ = 0.5
    assert out["unlabeled_weight"] == pytest.approx(0.5 * math.exp(-5)) and seen[-1] == 4  # labeled + unlabeled
    assert out["ema_decay"] == 0.0 and task.eval_net() is task.nets["teacher"]
    out = run_steps(trainer, 5)
    assert out[-1]["unlabeled_weight"] == pytest.approx(0.5 * math.exp(-5 * 0.5 ** 2))  # t = 9: (9 - 4) / 10
    assert out[-1]["ema_decay"] == pytest.approx(5 / 6)  # t - W = 5: min(1 - 1/6, 7/8)
    out = run_steps(trainer, 10)
    assert out[-1]["unlabeled_weight"] == 0.5 and out[-1]["ema_decay"] == pytest.approx(7 / 8)  # capped


def test_mean_teacher_defaults_are_the_documented_ones():
    o = MeanTeacherOptions()
    assert (o.sup_warmup, o.rampup, o.conf_threshold, o.ema_momentum, o.ema_horizon, o.unsup_weight) == (
        0.1, 0.2, 0.95, 0.99, 0.1, 0.5)


# ------------------------------------------------------------------------------------ gta-seg, momentum-pl
def test_gta_default_schedule_is_a_share_of_the_stage_with_capped_emas(tmp_path):
    torch.manual_seed(0)
    lab, unl = streams(repeat=True)  # an epoch is 4 steps
    task = GTATask(TinySeg(), lab, unl, StageInputs("gta-seg", GTASegOptions(), 30), seed=5)
    assert task.sup_steps == 3  # 10 % of 30, whatever the epoch
    # both EMAs: min(0.999, 1 - 1/(0.1 * 27)) = 1 - 1/2.7; warm-up 1 - 1/(t+1) until it reaches the cap
    assert task.student_to_teacher.momentum == pytest.approx(1 - 1 / 2.7)
    assert task.ta_to_student.momentum == pytest.approx(1 - 1 / 2.7)
    assert [round(task.student_to_teacher.decay(t), 4) for t in (0, 1, 2, 20)] == [0.0, 0.5, 0.6296, 0.6296]
    code = GTASegOptions(sup_only_epochs=1, ema_horizon=None)
    released = GTATask(TinySeg(), lab, unl, StageInputs("gta-seg", code, 30), seed=5)
    assert released.sup_steps == 4 and released.student_to_teacher.decay(20) == pytest.approx(20 / 21)


def test_momentum_pl_per_step_ema_with_capped_momentum_by_hand(tmp_path):
    torch.manual_seed(0)
    lab, _ = streams(n_lab=6)  # 3 steps per epoch
    # per step, m = min(0.95, 1 - 1/2)
    task = TeacherTask(TinySeg(), lab, StageInputs("teacher", MomentumPLOptions(), 20))
    assert task.emas[0].momentum == 0.5
    trainer = trainer_for(task, tmp_path)
    m0 = params(task.nets["momentum"])
    run_steps(trainer, 1)  # inside the first epoch: the momentum net moves already
    model = params(task.nets["model"])
    for k, v in params(task.nets["momentum"]).items():
        torch.testing.assert_close(v, 0.5 * m0[k] + 0.5 * model[k], rtol=0, atol=1e-6)
    # 100 epoch updates
    epoch = TeacherTask(TinySeg(), lab, StageInputs("teacher", MomentumPLOptions(ema_every="epoch"), 300))
    assert epoch.emas[0].momentum == pytest.approx(0.9)  # min(0.95, 1 - 1/(0.1 * 100))


def test_a_tiny_momentum_pl_run_delivers_a_net_that_moved(tmp_path, monkeypatch):
    """6 steps per stage: the released per-epoch EMA delivers a net that barely moved (the warning), the
    default per-step, capped EMA one that trained."""
    from semiseg import api
    from tests.safety_helpers import TINY, make_folder

    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data", unlabeled=6)
    moved = {}
    for name, extra in [("step", []), ("epoch", ["method.ema_every=epoch", "method.ema_horizon=null"])]:
        cfg = load_config(None, [*TINY, f"data.source={data}", f"name={name}", f"out_dir={tmp_path / 'runs'}",
                                 "train.lr=0.01", "method.name=momentum-pl", "method.augment=run", *extra])
        api.run(cfg, log=lambda *_: None)
        results = json.loads((tmp_path / "runs" / name / "results.json").read_text())
        moved[name] = (max(results["moved_from_init"][g] for g in ("decoder", "classifier")), results["warnings"])
        # the options that make this run a variant are recorded (bench rows tell controls from variants by them)
        assert results["method_options"] == {"augment": "run", **({"ema_every": "epoch", "ema_horizon": None}
                                                                   if extra else {})}
    assert moved["step"][0] > MOVED_WARNING and not moved["step"][1]
    assert moved["epoch"][0] < MOVED_WARNING and "barely moved" in moved["epoch"][1][0]


# ------------------------------------------------------------------------ the options of issue 25 are keyed
@pytest.mark.parametrize("method,option,value,stage", [
    ("gta-seg", "ta_to_student_scope", "all_but_classifier", "gta-seg"),
    ("gta-seg", "ta_schedule", "poly", "gta-seg"),
    ("momentum-pl", "labeled_loss", "dice", "teacher"),
    ("momentum-pl", "labeled_loss", "dice", "student"),
    ("momentum-pl", "teacher_view", "student", "student"),
    ("momentum-pl", "teacher_retain", 0.3, "student"),
    ("momentum-pl", "teacher_mode", "train", "student"),
    ("stso", "generation_scale", 2.0, "student-1"),
    ("stso", "strong_aug", False, "student-1"),
    ("stso", "tta_flip", False, "label-1"),
    ("atso", "generation_scale", 2.0, "final"),
    ("self-learning", "strong_aug", False, "student-1"),
    ("dst-cbc", "strong_aug", False, "round-1"),
    ("dst-cbc", "round_lr_scale", 0.1, "round-1"),
])
def test_a_changed_option_is_never_served_a_stage_trained_without_it(method, option, value, stage):
    extra = {"generations": 1} if method in ("stso", "atso", "self-learning") else {}
    base, changed = method_for(method, **extra), method_for(method, **extra, **{option: value})
    assert base.pipeline[stage].key_hash != changed.pipeline[stage].key_hash


def test_momentum_pl_student_options_leave_the_shared_teacher_stage_alone():
    base = method_for("momentum-pl")
    for option, value in (("teacher_view", "student"), ("teacher_retain", 0.3), ("teacher_mode", "train")):
        assert method_for("momentum-pl", **{option: value}).pipeline["teacher"].key_hash == \
            base.pipeline["teacher"].key_hash, option
