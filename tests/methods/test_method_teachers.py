"""``ensemble-st``'s ``teachers``: another registered method planned inside the run as a teacher, its stages keyed
as its own run keys them (shared under one out_dir), its delivered net one member of the labelling mean."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.api import config_from_dict
from semiseg.errors import ConfigError
from semiseg.pipeline.labeling import make_labeler
from semiseg.pipeline.stages import run_stages
from tests.methods.test_ensemble_st import STPP
from tests.methods.test_self_training import one_thread, synthetic_run  # noqa: F401

ATSO = {"generations": 1, "generation_steps": 4, "tta_flip": False}


def test_a_teacher_method_is_planned_as_its_own_run_plans_it(tmp_path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    _, plain = synthetic_run(data, out, "es", "ensemble-st", **STPP)
    _, mt = synthetic_run(data, out, "mt", "mean-teacher")
    _, atso = synthetic_run(data, out, "atso", "atso", **ATSO)
    _, es = synthetic_run(data, out, "es3", "ensemble-st", teachers={"mean-teacher": {}, "atso": ATSO}, **STPP)
    stages = {s.name: s for s in es.stages()}
    nested = [n for n in stages if "." in n]
    assert nested == ["mean-teacher.mean-teacher"] + [f"atso.{s.name}" for s in atso.stages()[:-1]]
    assert list(stages)[-3:] == ["label-ensemble", "retrain-ensemble", "diagnostics"]  # no teacher's diagnostics
    # the same keys as the methods' own runs: a mean-teacher or atso run under this out_dir is read back
    assert stages["mean-teacher.mean-teacher"].key_hash() == mt.stages()[0].key_hash()
    assert [stages[f"atso.{s.name}"].key_hash() for s in atso.stages()[:-1]] == \
        [s.key_hash() for s in atso.stages()[:-1]]
    # S's and U's stages are unchanged; the labels read all four teachers, mean-teacher's through its EMA teacher
    before = {s.name: s.key_hash() for s in plain.stages()}
    assert all(stages[n].key_hash() == h for n, h in before.items() if n not in ("label-ensemble", "retrain-ensemble",
                                                                                  "diagnostics"))
    label = stages["label-ensemble"].key
    assert label["inputs"][:4] == [before["retrain-all"], before["unimatch"], mt.stages()[0].key_hash(),
                                   atso.stages()[-2].key_hash()]
    assert label["variant"]["nets"] == [None, None, "teacher", None]
    assert "nets" not in plain.stages()[7].key["variant"]  # no named net: the key of runs from before the option
    assert stages["retrain-ensemble"].key_hash() != before["retrain-ensemble"]
    assert es.trained_steps() == plain.trained_steps()  # the student from scratch: the same control
    # a teacher's option keys its own stages, and through them the labels and the student
    teachers = {"mean-teacher": {}, "atso": {**ATSO, "generation_steps": 5}}
    _, longer = synthetic_run(data, out, "es4", "ensemble-st", teachers=teachers, **STPP)
    changed = {s.name: s.key_hash() != stages[s.name].key_hash() for s in longer.stages() if s.key is not None}
    assert changed["atso.supervised"] is False and changed["atso.student-1A"] and changed["atso.final"]
    assert changed["label-ensemble"] and changed["retrain-ensemble"] and not changed["mean-teacher.mean-teacher"]


@pytest.mark.parametrize(("teachers", "message"), [
    ({"no-such": {}}, "unknown method 'no-such'"),
    ({"ensemble-st": {}}, "cannot be its own teacher"),
    ({"atso": {"generations": 0}}, "atso: generations: Input should be greater than or equal to 1"),
    ({"atso": {"typo": 1}}, "atso: typo: Extra inputs are not permitted"),
])
def test_a_bad_teacher_is_a_config_error_naming_it(teachers: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"method\.teachers.*{message}"):
        config_from_dict({"method": {"name": "ensemble-st", "teachers": teachers}})


def test_a_teachers_config_check_runs_with_the_method(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"method\.teachers\.st\+\+: method\.checkpoints=5 needs train\.steps >= 5"):
        config_from_dict({"train": {"steps": 4}, "method": {"name": "ensemble-st", "checkpoints": 2,
                                                             "teachers": {"st++": {"checkpoints": 5}}}})


def test_the_teachers_stage_is_read_back_and_its_ema_net_labels(tmp_path, one_thread: None) -> None:  # noqa: F811
    data, out = tmp_path / "data", tmp_path / "runs"
    run_mt, mt = synthetic_run(data, out, "mt", "mean-teacher", steps=8)
    run_stages(run_mt.run_dir, mt.stages(), out_dir=out, log=lambda m: None)
    run, es = synthetic_run(data, out, "es", "ensemble-st", steps=8, teachers={"mean-teacher": {}}, **STPP)
    logged: list[str] = []
    run_stages(run.run_dir, es.stages(), out_dir=out, log=logged.append)
    assert any(m.startswith("stage 7-mean-teacher.mean-teacher: identical to") for m in logged)
    refs = es.pipeline.refs
    members = [refs["retrain-all"].model(), refs["unimatch"].model(),
               refs["mean-teacher.mean-teacher"].model(net="teacher")]
    images, stems = run.arrays("unlabeled").images, run.arrays("unlabeled").stems
    each = [dict(make_labeler(run, m).iter_predictions(images, [0, 1])) for m in members]
    rnd = refs["label-ensemble"].round()
    for i in (0, 1):
        mean = sum(e[i] for e in each) / 3
        assert np.array_equal(rnd.labels(stems[i]), mean.argmax(0).astype(np.uint8))
