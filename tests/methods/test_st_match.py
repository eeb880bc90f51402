"""``st++match``: ST++'s stages, shared with an ``st++`` run, then a UniMatch stage from its last student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semiseg.engine.checkpoint import load_checkpoint
from semiseg.methods import st_match
from semiseg.pipeline.stages import run_stages
from tests.methods.test_self_training import STPP_STAGES, one_thread, synthetic_run  # noqa: F401

STPP = {"retrain_steps": 4, "tta_scales": [1.0], "tta_flip": False}


def test_plan_shares_st_plus_plus_stages_and_counts_their_steps(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    _, pp = synthetic_run(data, out, "pp", "st++", **STPP)
    _, sm = synthetic_run(data, out, "sm", "st++match", online_scale=0.5, **STPP)
    names = [s.name for s in sm.stages()]
    assert names == [n.split("-", 1)[1] for n in STPP_STAGES] + ["online", "diagnostics"]
    # ST++'s stages keep st++'s keys: one out_dir trains them once for both methods
    assert [s.key_hash() for s in sm.stages()[:6]] == [s.key_hash() for s in pp.stages()[:6]]
    online = sm.stages()[6]
    assert online.key["steps"] == 6  # 0.5 x train.steps (12)
    assert sm.trained_steps() == pp.trained_steps() + 6
    # an online option changes the online stage only; an ST++ option changes ST++'s re-trainings too
    _, other = synthetic_run(data, out, "x", "st++match", online_scale=0.5, fp_weight=0.0, **STPP)
    assert [a.key_hash() == b.key_hash() for a, b in zip(sm.stages()[:7], other.stages()[:7], strict=True)] == \
        [True] * 6 + [False]


def test_online_stage_starts_from_the_last_student_and_learns_its_pseudo_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:  # noqa: F811
    seen: dict[str, object] = {}
    original = st_match.UniMatchTask.__init__

    def spy(self, model, loaders, stage, **kwargs):  # noqa: ANN001, ANN202
        seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["labeled"] = loaders["labeled"]
        original(self, model, loaders, stage, **kwargs)

    monkeypatch.setattr(st_match.UniMatchTask, "__init__", spy)
    run, sm = synthetic_run(tmp_path / "data", tmp_path / "runs", "sm", "st++match", steps=8, online_scale=0.5,
                            online_lr_scale=0.1, **STPP)
    dirs = run_stages(run.run_dir, sm.stages(), out_dir=tmp_path / "runs", log=lambda m: None)
    assert [d.name for d in dirs][-2:] == ["6-online", "7-diagnostics"]
    student = load_checkpoint(dirs[5] / "checkpoints" / "best.pt")["net"]
    assert all(torch.equal(seen["weights"][k], student[k]) for k in student)
    # its labeled stream is the student's training set: labeled images oversampled + every pseudo-labelled one
    dataset = seen["labeled"].dataset
    n_lab, n_unl = len(run.splits.labeled), len(run.splits.unlabeled)
    assert dataset.n_pseudo == n_unl and dataset.n_labeled == n_lab * -(-n_unl // n_lab)
    final = sm.final_model().state_dict()
    best = load_checkpoint(dirs[6] / "checkpoints" / "best.pt")["net"]
    assert all(torch.equal(final[k], best[k]) for k in best)
