"""The training loop: LR schedule, parameter groups, resumable batch streams, resume == uninterrupted, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semiseg.engine.loader import EndlessLoader
from semiseg.engine.trainer import poly_factor
from tests.engine_helpers import data, make_trainer

ROOT = Path(__file__).resolve().parents[2]


def test_poly_factor_hand_values():
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(100, 100, 0.9) == 0.0


def test_head_lr_multiplier_and_poly_per_iteration(tmp_path):
    trainer = make_trainer(tmp_path, steps=10, batch=4)
    opt = trainer.optimizers["model"]
    enc, head = opt.param_groups
    assert enc["base_lr"] == pytest.approx(0.05) and head["base_lr"] == pytest.approx(0.5)
    trainer.step = 5
    trainer._set_lr()
    assert enc["lr"] == pytest.approx(0.05 * 0.5**0.9) and head["lr"] == pytest.approx(0.5 * 0.5**0.9)


def test_loader_is_deterministic_and_resumable():
    a = EndlessLoader(data(), 5, seed=3)
    first = [next(a)["image"] for _ in range(9)]  # crosses an epoch boundary (24 // 5 = 4 per epoch)
    assert a.epoch == 2 and a.batch == 1
    b = EndlessLoader(data(), 5, seed=3)
    for _ in range(4):
        next(b)
    c = EndlessLoader(data(), 5, seed=3)
    c.load_state_dict(b.state_dict())
    for expected in first[4:]:
        assert torch.equal(next(c)["image"], expected)


def test_loader_ranks_partition_the_global_batch():
    single = EndlessLoader(data(), 8, seed=1)
    ranks = [EndlessLoader(data(), 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = next(single)["image"]
        parts = torch.cat([next(r)["image"] for r in ranks])
        assert torch.equal(whole, parts)


def test_small_set_is_repeated_to_fill_a_batch():
    loader = EndlessLoader(data(n=3), 8, seed=0)
    assert next(loader)["image"].shape[0] == 8


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.task.eval_net().state_dict().items()}


def test_resume_equals_uninterrupted_in_process(tmp_path):
    torch.use_deterministic_algorithms(True)
    straight = make_trainer(tmp_path / "a", steps=12, batch=4)
    straight.fit()
    first = make_trainer(tmp_path / "b", steps=12, batch=4, checkpoint_every=5)
    first.total = 12
    # run 7 steps, then "crash": the newest checkpoint is step 5, two steps are lost
    first.train.steps = 12
    orig_step = first.task.train_step
    calls = {"n": 0}

    def crashing(batches, ctx):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return orig_step(batches, ctx)

    first.task.train_step = crashing
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = make_trainer(tmp_path / "b", steps=12, batch=4)
    resumed.fit()
    wa, wb = _weights(straight), _weights(resumed)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    log_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["train/loss"] for x in log_a if "train/loss" in x] == \
           [json.loads(x)["train/loss"] for x in log_b if "train/loss" in x]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    """2 gloo processes × batch 4 == 1 process × batch 8 (same global batches; no BatchNorm in this net).
    Tolerance 1e-5: only the order of floating-point gradient averaging differs."""
    torch.use_deterministic_algorithms(True)
    single = make_trainer(tmp_path / "single", steps=6, batch=8, dropout=0.0)
    single.fit()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "tests" / "engine_helpers.py"), str(tmp_path / "ddp"), "6", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "final.pt")
    for k, v in single.task.eval_net().state_dict().items():
        torch.testing.assert_close(ddp[k], v, atol=1e-5, rtol=1e-4)
