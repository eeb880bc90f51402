"""train.loss: every method's labeled term is the run's loss (the warm-ups too), and it is in every stage key."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from semiseg.losses import cross_entropy
from semiseg.methods.gta_seg import GTASegOptions, GTATask
from semiseg.methods.mean_teacher import MeanTeacherOptions, MeanTeacherTask
from semiseg.methods.momentum_pl import MomentumPLOptions, StudentTask, TeacherTask
from semiseg.pipeline.plan import StageInputs
from tests.method_helpers import method_for
from tests.methods.test_online_methods import TinySeg, peek, run_steps, streams, trainer_for


class Spy:
    """A labeled loss that records the targets it was given (cross-entropy underneath)."""

    def __init__(self) -> None:
        self.targets: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.targets.append(target.clone())
        return cross_entropy(logits, target)


def tasks(spy: Spy):
    torch.manual_seed(0)
    lab, unl = streams(strong=True)
    yield "mean-teacher", lab, MeanTeacherTask(TinySeg(), lab, unl, StageInputs(
        "mt", MeanTeacherOptions(sup_warmup=0.1), 20, labeled_loss=spy))
    lab, unl = streams(repeat=True)
    yield "gta-seg", lab, GTATask(TinySeg(), lab, unl, StageInputs("gta", GTASegOptions(), 20, labeled_loss=spy),
                                  seed=5)
    lab, unl = streams()
    yield "momentum-pl teacher", lab, TeacherTask(TinySeg(), lab, StageInputs(
        "t", MomentumPLOptions(augment="run"), 20, labeled_loss=spy))
    lab, unl = streams(strong=True)
    yield "momentum-pl student", lab, StudentTask(TinySeg(), TinySeg(), lab, unl, StageInputs(
        "s", MomentumPLOptions(augment="run"), 20, labeled_loss=spy))


@pytest.mark.parametrize("which", ["mean-teacher", "gta-seg", "momentum-pl teacher", "momentum-pl student"])
def test_the_labeled_term_of_every_step_is_the_runs_loss(tmp_path, which):
    spy = Spy()
    name, lab, task = next(t for t in tasks(spy) if t[0] == which)
    first = peek(lab)["mask"]  # the labeled batch of the first step
    run_steps(trainer_for(task, tmp_path), 4)  # warm-up steps (2 of 20) and semi-supervised ones
    assert len(spy.targets) >= 4, name
    assert all(t.shape[0] == lab.batch_size for t in spy.targets)  # labeled masks only, never pseudo labels
    assert torch.equal(spy.targets[0], first)


def test_the_loss_is_in_every_stage_key():
    for name in ("supervised", "st++", "mean-teacher", "momentum-pl", "fixmatch", "dst-cbc"):
        ce, dice = method_for(name), method_for(name)
        dice.run.config.train.loss = "dice"
        dice._pipeline = None  # plan again with the other loss
        assert [r.key_hash for r in ce.pipeline.refs.values() if r.key_hash] != \
            [r.key_hash for r in dice.pipeline.refs.values() if r.key_hash], name
        teacher = next(iter(ce.pipeline.refs.values()))
        assert teacher.key_hash != next(iter(dice.pipeline.refs.values())).key_hash, name  # no CE teacher reused


def test_dst_cbc_round_with_another_loss_gives_the_labeled_half_that_loss():
    """Under a Dice protocol a round's loss is the dynamic CE of the pseudo half plus the run's loss of the
    labeled half; under cross-entropy it stays the paper's one dynamic CE over both halves."""
    from semiseg.losses import dice_loss, dynamic_cross_entropy
    from semiseg.methods.dst_cbc import DstCbcTask

    torch.manual_seed(0)
    logits = torch.randn(4, 2, 3, 3)
    target = torch.randint(0, 2, (4, 3, 3))
    target[0, 0, 0] = 255

    class Net(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN202
            return logits

    seen = {}

    def step(labeled_loss):  # noqa: ANN001, ANN202
        task = DstCbcTask(Net(), None, None, gamma=2.0, labeled_loss=labeled_loss)
        batches = {"pseudo": {"image": torch.zeros(2, 3, 3, 3), "mask": target[:2]},
                   "labeled": {"image": torch.zeros(2, 3, 3, 3), "mask": target[2:]}}
        ctx = SimpleNamespace(autocast=contextlib.nullcontext,
                              optimize=lambda name, loss: seen.__setitem__("loss", loss))
        task.train_step(batches, ctx)
        return seen["loss"]

    dice = lambda lg, t: dice_loss(lg, t)  # noqa: E731
    expected = dynamic_cross_entropy(logits[:2], target[:2], gamma=2.0, pseudo_count=2) + dice(logits[2:], target[2:])
    assert step(dice) == pytest.approx(expected.item())
    assert step(None) == pytest.approx(dynamic_cross_entropy(logits, target, gamma=2.0, pseudo_count=2).item())
