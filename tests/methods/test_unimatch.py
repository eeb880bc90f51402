"""FixMatch and UniMatch: threshold selection, both CutMix streams and the feature-perturbation stream against
hand computations on tiny tensors; the loss line of the released code; resume after SIGKILL; the CLI end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.data.transforms import cutmix_boxes, paste_boxes
from semiseg.methods import fixmatch, unimatch
from semiseg.methods.fixmatch import FixMatchOptions, FixMatchTask, weak_strong_streams
from semiseg.methods.online import _channel_dropout, feature_perturbation, hard_pseudo_labels
from semiseg.methods.unimatch import UniMatchOptions, UniMatchTask
from semiseg.pipeline.plan import StageInputs
from semiseg.pseudo.policies import ClassBalanced, ClassRelativeThreshold, FixedThreshold
from tests.methods.test_online_methods import (
    DETERMINISTIC,
    KILLED,
    TinySeg,
    _assert_same_run,
    _kill_and_resume,
    peek,
    run_steps,
    trainer_for,
)
from tests.methods.test_self_training import fake_run


# ------------------------------------------------------------------------------------------- helpers
def tiny_run(tmp_path, n_lab: int = 4, n_unl: int = 6):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 256, size=(n_lab, 8, 8, 3), dtype=np.uint8)
    unl = rng.integers(0, 256, size=(n_unl, 8, 8, 3), dtype=np.uint8)
    return fake_run(tmp_path, unl, labeled=lab, labeled_masks=(lab[..., 0] > 128).astype(np.uint8))


def task_for(tmp_path, options, cls=FixMatchTask, views: int = 1, steps: int = 100):
    run = tiny_run(tmp_path)
    torch.manual_seed(0)
    task = cls(TinySeg(), weak_strong_streams(run, 7, options, views), StageInputs("fixmatch", options, steps),
               seed=11, views=views)
    return task, trainer_for(task, tmp_path)


class Recorder:
    """Every forward of a net: (training?, input batch, output batch)."""

    def __init__(self, net: nn.Module) -> None:
        self.calls: list[tuple[bool, torch.Tensor, torch.Tensor]] = []
        net.register_forward_hook(lambda m, a, out: self.calls.append((m.training, a[0].detach(), out.detach())))


# ------------------------------------------------------------------------------------------ selection
def test_threshold_policy_selects_on_tensors_like_on_arrays():
    # confidences: softmax([0, 4]) = 0.982, softmax([0, 1]) = 0.731, softmax([3, 0]) = 0.953, 0.5
    logits = torch.tensor([[[0.0, 0.0], [3.0, 0.0]], [[4.0, 1.0], [0.0, 0.0]]]).unsqueeze(0)
    probs = logits.softmax(dim=1)
    label, conf = FixedThreshold(0.95).on_tensor(probs)
    assert label.dtype == torch.long and label[0].tolist() == [[1, 255], [0, 255]]
    assert conf[0].flatten().tolist() == pytest.approx([0.98201, 0.73106, 0.95257, 0.5], abs=1e-5)
    assert label[0].tolist() == FixedThreshold(0.95)(probs)[0][0].tolist()  # the offline (numpy) path agrees
    ignore = torch.tensor([[[False, False], [True, False]]])
    assert hard_pseudo_labels(logits, policy=FixedThreshold(0.95), ignore=ignore)[0][0].tolist() == [[1, 255],
                                                                                                    [255, 255]]
    with pytest.raises(TypeError, match="whole set"):
        ClassBalanced(0.5).on_tensor(probs)


def test_class_relative_threshold_scales_each_class_by_its_mean_probability():
    # 4 pixels, 2 classes; class means 0.7075 and 0.2925, so class 1's threshold is 0.95 · 0.2925 / 0.7075 = 0.3928
    probs = torch.tensor([[0.97, 0.96, 0.6, 0.3], [0.03, 0.04, 0.4, 0.7]]).reshape(1, 2, 2, 2)
    policy = ClassRelativeThreshold(0.95)
    assert policy.class_thresholds(probs).tolist() == pytest.approx([0.95, 0.95 * 0.2925 / 0.7075], abs=1e-6)
    label, conf = policy.on_tensor(probs)
    # background at 0.6 misses 0.95; foreground at 0.7 passes its 0.39, where one threshold for all would drop it
    assert label[0].tolist() == [[0, 0], [255, 1]]
    assert FixedThreshold(0.95).on_tensor(probs)[0][0].tolist() == [[0, 0], [255, 255]]
    assert policy(probs.numpy())[0].tolist() == label.tolist()  # the offline (numpy) path agrees


def test_fixmatch_threshold_rule_picks_the_policy(tmp_path):
    task, _ = task_for(tmp_path, FixMatchOptions(threshold_rule="class_relative"))
    assert type(task.policy) is ClassRelativeThreshold and task.policy.threshold == 0.95
    assert type(task_for(tmp_path / "b", FixMatchOptions())[0].policy) is FixedThreshold


# -------------------------------------------------------------------------------------------- CutMix
def test_cutmix_boxes_follow_the_released_sampler_by_hand():
    boxes = cutmix_boxes(3, 10, 10, np.random.default_rng(3), p=0.5)
    rng, hand = np.random.default_rng(3), torch.zeros(3, 10, 10, dtype=torch.bool)
    for i in range(3):  # obtain_cutmix_box: one area per box, aspect and place redrawn until the box fits
        if rng.random() < 0.5:
            size = rng.uniform(0.02, 0.4) * 100
            while True:
                ratio = rng.uniform(0.3, 1 / 0.3)
                w, h = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
                x, y = int(rng.integers(0, 10)), int(rng.integers(0, 10))
                if x + w <= 10 and y + h <= 10:
                    break
            hand[i, y:y + h, x:x + w] = True
    assert torch.equal(boxes, hand) and boxes.flatten(1).any(1).tolist() == [True, True, False]
    assert not cutmix_boxes(3, 10, 10, np.random.default_rng(4), p=0.0).any()
    # pasting: images B×C×H×W and maps B×H×W alike
    box = torch.tensor([[[True, False], [False, False]]])
    img_t, img_s = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    assert paste_boxes(box, img_t, img_s)[0, :, 0, 0].tolist() == [1, 1]
    assert paste_boxes(box, img_t, img_s).sum() == 2
    assert paste_boxes(box, torch.full((1, 2, 2), 7), torch.full((1, 2, 2), 3))[0].tolist() == [[3, 7], [7, 7]]


HAND_BOXES = [torch.tensor([[[True] * 4 + [False] * 4] * 8, [[False] * 8] * 8]),  # view 1: left half of image 0
              torch.tensor([[[False] * 8] * 8, [[False] * 8] * 4 + [[True] * 8] * 4])]  # view 2: bottom of image 1


@pytest.mark.parametrize("cls,options,views", [(FixMatchTask, FixMatchOptions(conf_threshold=0.6), 1),
                                               (UniMatchTask, UniMatchOptions(conf_threshold=0.6), 2)])
def test_both_cutmix_streams_get_the_mix_images_and_their_unmixed_labels(tmp_path, monkeypatch, cls, options, views):
    task, trainer = task_for(tmp_path, options, cls, views)
    boxes = iter(HAND_BOXES)
    monkeypatch.setattr(fixmatch, "cutmix_boxes", lambda *a, **k: next(boxes))
    seen = []
    real_ce = fixmatch.cross_entropy

    def spy(logits, target, **kw):
        seen.append((target, kw.get("normalize_by")))
        return real_ce(logits, target, **kw)

    monkeypatch.setattr(fixmatch, "cross_entropy", spy)
    monkeypatch.setattr(unimatch, "cross_entropy", spy)
    lab, unl, mix = (peek(ld) for ld in task.loaders.values())
    before = copy.deepcopy(task.nets["model"])
    rec = Recorder(task.nets["model"])
    run_steps(trainer, 1)
    # the forwards: eval mix labelling, [x; weak] (doubled by the FP stream in UniMatch), the strong views together
    shapes = [(training, len(x), len(out)) for training, x, out in rec.calls]
    assert shapes == [(False, 2, 2), (True, 4, 8 if cls is UniMatchTask else 4), (True, 2 * views, 2 * views)]
    # by hand: the mix batch's weak view labelled by the pre-step net in eval mode; u's weak view by the
    # train-mode [x; u] forward (FixMatch: recomputed here; UniMatch: its clean half, BN saw the FP half too)
    with torch.no_grad():
        mix_conf, mix_label = before.eval()(mix["image"]).softmax(1).max(1)
        weak = rec.calls[1][2][2:4]
        if cls is FixMatchTask:
            assert torch.allclose(weak, before.train()(torch.cat([lab["image"], unl["image"]]))[2:], atol=1e-6)
    conf, label = weak.softmax(1).max(1)
    mix_label[(mix_conf < 0.6) | (mix["mask"] == 255)] = 255
    label[(conf < 0.6) | (unl["mask"] == 255)] = 255
    assert (label != 255).any() and (label == 255).any() and (mix_label != label).any()
    strong_in = rec.calls[2][1].chunk(views)
    for v, key in enumerate(["image_strong", "image_strong2"][:views]):
        box = HAND_BOXES[v]
        assert torch.equal(strong_in[v], torch.where(box[:, None], mix[key], unl[key]))
        target, norm = seen[v]  # (the labeled term is the stage's labeled_loss, not this module's CE)
        assert torch.equal(target, torch.where(box, mix_label, label))
        assert torch.equal(norm, torch.where(box, mix["mask"] != 255, unl["mask"] != 255))
    if cls is UniMatchTask:  # the FP stream learns the weak labels, uncut
        assert torch.equal(seen[2][0], label) and torch.equal(seen[2][1], unl["mask"] != 255)
    assert len(seen) == views + (cls is UniMatchTask)


def test_the_mix_stream_holds_the_same_images_differently_augmented_or_others(tmp_path):
    run = tiny_run(tmp_path, n_unl=12)
    same = weak_strong_streams(run, 3, FixMatchOptions(), 1)
    other = weak_strong_streams(run, 3, FixMatchOptions(mix_partner="other_image"), 1)
    u, m, o = next(same["unlabeled"]), next(same["mix"]), next(other["mix"])
    assert torch.equal(u["index"], m["index"]) and not torch.equal(u["image_strong"], m["image_strong"])
    assert not torch.equal(u["index"], o["index"])


# ------------------------------------------------------------------------------ feature perturbation
def test_feature_perturbation_by_hand_and_only_inside_its_block():
    torch.manual_seed(0)
    net, x = TinySeg().eval(), torch.rand(2, 3, 8, 8)
    plain = net(x)
    with torch.no_grad(), feature_perturbation(net, 0.5, torch.Generator().manual_seed(3)):
        doubled = net(x)
    assert doubled.shape[0] == 4 and torch.equal(doubled[:2], plain.detach())
    keep = (torch.rand(2, 6, generator=torch.Generator().manual_seed(3)) >= 0.5).float() / 0.5
    hand = net.segmentation_head(net.decoder(net.encoder(x) * keep[:, :, None, None]))
    assert 0 < keep.count_nonzero() < 12 and torch.allclose(doubled[2:], hand.detach(), atol=1e-6)
    # outside the block: no hook left, eval forward unchanged and deterministic
    assert not net.encoder._forward_hooks
    assert torch.equal(net(x), plain) and torch.equal(net(x), net(x))
    with torch.no_grad(), feature_perturbation(net, 0.0, torch.Generator().manual_seed(3)):
        assert torch.equal(net(x)[2:], plain.detach())  # p = 0: the second decoding is the first
    feats = torch.ones(1, 4, 2, 2)
    dropped = _channel_dropout(feats, 0.5, torch.Generator().manual_seed(1))
    assert set(dropped.flatten().tolist()) <= {0.0, 2.0} and (dropped == dropped[:, :, :1, :1]).all()


def test_feature_perturbation_on_an_smp_model_keeps_the_input_normalisation():
    from semiseg.config import ModelConfig
    from semiseg.models.factory import build_model
    from tests.methods.test_self_training import TINY_ENCODER

    torch.manual_seed(0)
    net = build_model(ModelConfig(encoder=TINY_ENCODER, weights="none", decoder_channels=[16, 8, 8],
                                  options={"encoder_depth": 3}), 2).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain = net(x)
        with feature_perturbation(net, 0.5, torch.Generator().manual_seed(0)):
            doubled = net(x)
        assert torch.equal(doubled[:2], plain)  # the model's own forward ran: normalisation hook included
        assert not torch.equal(doubled[2:], plain) and torch.equal(net(x), plain)


def test_unimatch_step_loss_is_the_released_line_and_leaves_the_eval_net_plain(tmp_path):
    task, trainer = task_for(tmp_path, UniMatchOptions(conf_threshold=0.6), UniMatchTask, 2)
    logs = run_steps(trainer, 2)
    for log in logs:  # (loss_x + 0.25 s1 + 0.25 s2 + 0.5 fp) / 2 with loss_strong = mean(s1, s2)
        assert log["loss"] == pytest.approx((log["loss_labeled"] + 0.5 * log["loss_strong"] + 0.5 * log["loss_fp"]) / 2,
                                            rel=1e-5)
    net, x = task.eval_net().eval(), torch.rand(2, 3, 8, 8)
    assert not net.encoder._forward_hooks and torch.equal(net(x), net(x)) and net(x).shape[0] == 2
    fm_task, fm_trainer = task_for(tmp_path / "fm", FixMatchOptions(), FixMatchTask, 1)
    log = run_steps(fm_trainer, 1)[0]
    assert "loss_fp" not in log and log["loss"] == pytest.approx(0.5 * (log["loss_labeled"] + log["loss_strong"]),
                                                                  rel=1e-5)


@pytest.mark.parametrize("cls, options", [(FixMatchTask, FixMatchOptions(sup_warmup=0.25)),
                                          (UniMatchTask, UniMatchOptions(sup_warmup=0.25))])
def test_supervised_warmup_learns_the_labeled_batch_only(tmp_path, cls, options):
    task, trainer = task_for(tmp_path, options, cls, 2 if cls is UniMatchTask else 1, steps=8)
    assert task.warmup_steps == 2  # a quarter of 8 steps
    net = task.nets["model"]
    calls = Recorder(net)
    lab = peek(task.loaders["labeled"])
    logs = run_steps(trainer, 2)
    # the warm-up steps: one train-mode forward each, of the labeled batch, and loss_scale x its CE
    assert len(calls.calls) == 2 and all(training for training, _, _ in calls.calls)
    assert torch.equal(calls.calls[0][1], lab["image"])
    assert all(set(log) == {"loss", "loss_labeled", "unlabeled_weight"} for log in logs)
    assert all(log["unlabeled_weight"] == 0 for log in logs)
    assert logs[0]["loss"] == pytest.approx(0.5 * logs[0]["loss_labeled"], rel=1e-6)
    logs += run_steps(trainer, 1)  # then the whole method: the mix labels, [x; weak u], the strong views
    assert len(calls.calls) >= 5
    assert "loss_strong" in logs[2] and "pseudo_coverage" in logs[2]


def test_unlabeled_ce_divides_by_every_real_pixel():
    logits = torch.zeros(1, 2, 1, 4)  # CE = ln 2 everywhere
    target = torch.tensor([[[0, 255, 255, 1]]])
    real = torch.tensor([[[True, True, True, False]]])
    assert fixmatch.cross_entropy(logits, target, normalize_by=real).item() == pytest.approx(2 * np.log(2) / 3)
    assert fixmatch.cross_entropy(logits, target).item() == pytest.approx(np.log(2))
    assert F.cross_entropy(logits, target, ignore_index=255).item() == pytest.approx(np.log(2))


# ------------------------------------------------------------------------------- end to end (real CLI)
@pytest.mark.slow
def test_unimatch_sigkill_resume_equals_uninterrupted(tmp_path):
    """Killed mid-run; boxes and dropout masks are drawn from (seed, rank, step), so nothing else must resume."""
    from tests.cli_helpers import semiseg, train_args

    extra = [*DETERMINISTIC, "method.name=unimatch", "train.batch_size=2"]
    semiseg(train_args("straight", tmp_path / "runs", extra), tmp_path)
    _kill_and_resume(tmp_path, "killed", extra, "0-unimatch", at_step=12)
    _assert_same_run(tmp_path / "runs" / "straight", tmp_path / KILLED / "killed", ["0-unimatch"])


@pytest.mark.parametrize("method", ["unimatch", "fixmatch"])
def test_train_through_the_cli(tmp_path, method):
    from tests.cli_helpers import semiseg, train_args

    semiseg(train_args(method, tmp_path / "runs", [f"method.name={method}", "train.steps=6"]), tmp_path)
    run = tmp_path / "runs" / method
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["trained_steps"] == 6 and "dice" in results["test"]
    logged = [json.loads(line) for line in (run / "stages" / f"0-{method}" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    assert "loss_strong" in str(keys) and ("loss_fp" in str(keys)) == (method == "unimatch")
