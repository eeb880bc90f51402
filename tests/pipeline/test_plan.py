"""The pipeline's plan: what a stage's key holds, what its task is handed, and the seal on undeclared options."""

from __future__ import annotations

from pathlib import Path

import pytest

from semiseg.options import ALL, OptionSlice, UndeclaredOptionError
from semiseg.pipeline import plan
from semiseg.pipeline.plan import BestOf, Pipeline, StageInputs, StageRef
from semiseg.pseudo.policies import SelectAll
from tests.method_helpers import method_for


def pipeline_for(**options: object) -> Pipeline:
    """An empty pipeline over a fake run whose method (mean-teacher) has ``options``."""
    return Pipeline(method_for("mean-teacher", **options).run)


def captured_task(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Replace the trainer: a training stage's work then only builds its task (captured) and trains nothing."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(plan, "fit", lambda run, task, path, steps: seen.update(task=task, steps=steps))
    monkeypatch.setattr(plan, "seed_everything", lambda seed: None)
    return seen


def test_the_key_holds_the_run_sections_the_declared_options_the_variant_and_the_inputs():
    p = pipeline_for(conf_threshold=0.8)
    first = p.add("first", lambda path: None, variant={"k": 3})
    second = p.add("second", lambda path: None, options=("conf_threshold",), inputs=[first], steps=7)
    key = p.stages[1].key
    assert key is not None
    assert key["options"] == {"conf_threshold": 0.8} and key["variant"] is None and key["steps"] == 7
    assert key["inputs"] == [first.key_hash] and p.stages[0].key["variant"] == {"k": 3}
    assert {"data", "model", "train", "split", "seed", "init_seed", "world_size", "val_metric"} <= set(key)
    assert second.options == ("conf_threshold",)
    never = p.add("report", lambda path: None, reuse=False)
    assert p.add("after", lambda path: None, inputs=[never]).key_hash is None  # unnamed inputs: never reused


def test_a_declared_option_changes_the_key_an_undeclared_one_does_not():
    def key(**options: object) -> str | None:
        return pipeline_for(**options).add("s", lambda path: None, options=("conf_threshold",)).key_hash

    assert key(conf_threshold=0.8) != key(conf_threshold=0.9)
    assert key(unsup_weight=0.7) == key(unsup_weight=0.2)


def test_a_declared_name_the_options_lack_fails_when_planned():
    with pytest.raises(ValueError, match=r"stage 's' declares option\(s\) \['treshold'\]"):
        pipeline_for().add("s", lambda path: None, options=("treshold",))
    with pytest.raises(TypeError, match="ALL"):
        pipeline_for().add("s", lambda path: None, options="conf_threshold")


def test_reading_an_undeclared_option_while_the_stage_runs_fails_and_names_both(tmp_path):
    p = pipeline_for()
    options = p.options
    reads: list[float] = []
    p.add("good", lambda path: reads.append(options.conf_threshold), options=("conf_threshold",))
    p.add("bad", lambda path: reads.append(options.unsup_weight), options=("conf_threshold",))
    p.stages[0].run(tmp_path)
    assert reads == [0.95]
    with pytest.raises(UndeclaredOptionError, match="stage 'bad' reads method option 'unsup_weight'"):
        p.stages[1].run(tmp_path)
    assert options.unsup_weight == 0.5 and options.name == "mean-teacher"  # outside a stage: unsealed


def test_a_label_stage_reads_no_option_while_it_runs(monkeypatch, tmp_path):
    p = pipeline_for()
    options = p.options
    monkeypatch.setattr(plan, "label_work", lambda run, **kw: lambda path: options.conf_threshold)
    teacher = p.add("teacher", lambda path: None)
    p.label("label", teacher=teacher, stems=["u0"], policy=SelectAll())
    with pytest.raises(UndeclaredOptionError, match="stage 'label'"):
        p.stages[1].run(tmp_path)


def test_a_task_is_handed_its_slice_its_steps_and_its_inputs(monkeypatch, tmp_path):
    seen = captured_task(monkeypatch)
    p = pipeline_for(conf_threshold=0.8)
    teacher = p.add("teacher", lambda path: None)
    handed: list[StageInputs] = []

    def task(stage: StageInputs) -> str:
        handed.append(stage)
        assert stage.options.conf_threshold == 0.8
        with pytest.raises(UndeclaredOptionError, match="stage 'student' reads method option 'unsup_weight'"):
            stage.options.unsup_weight  # noqa: B018 - not in the slice
        return "task"

    ref = p.train("student", task, options=("conf_threshold",), inputs=[teacher], init=teacher)
    p.stages[-1].run(tmp_path)
    stage = handed[0]
    assert isinstance(stage.options, OptionSlice) and stage.options.model_dump() == {"conf_threshold": 0.8}
    assert stage.steps == 12 == seen["steps"] and seen["task"] == "task"  # default: train.steps
    assert stage.inputs == (teacher,) and stage.init is teacher and ref.init is teacher
    assert p.trainings == [ref] and p.steps_behind(ref) == 12 + 0  # teacher: an add stage, no steps


def test_all_hands_the_options_object_itself(monkeypatch, tmp_path):
    captured_task(monkeypatch)
    p = pipeline_for(unsup_weight=0.2)
    handed: list[StageInputs] = []
    p.train("all", lambda stage: handed.append(stage), options=ALL, steps=5)
    p.stages[0].run(tmp_path)
    assert handed[0].options is p.options and handed[0].options.unsup_weight == 0.2 and handed[0].steps == 5
    assert p.stages[0].key["options"] == p.options.model_dump(mode="json")


def test_best_of_resolves_to_the_best_validated_stage_and_steps_follow_init(monkeypatch):
    p = pipeline_for()
    a = p.train("a", lambda stage: None, steps=10)
    b = p.train("b", lambda stage: None, steps=20, init=a)
    c = p.train("c", lambda stage: None, steps=30)
    metric = {"a": 0.5, "b": 0.7, "c": 0.7}
    monkeypatch.setattr(StageRef, "best_metric", lambda ref: metric[ref.name])
    assert BestOf([a, b, c]).resolve() is b  # first of the ties, as a strict improvement
    assert p.steps_behind(BestOf([a, b, c])) == 30 and p.steps_behind(c) == 30
    monkeypatch.setattr(StageRef, "best_metric", lambda ref: None)
    assert BestOf([a, b]).resolve() is b  # none validated: the last


def test_a_stage_name_is_used_once():
    p = pipeline_for()
    p.add("s", lambda path: None)
    with pytest.raises(ValueError, match="used twice"):
        p.add("s", lambda path: None)


def test_stage_paths_are_the_layouts(tmp_path: Path):
    p = pipeline_for()
    ref = p.add("s", lambda path: None)
    assert ref.path == Path("/nonexistent/run") / "stages" / "0-s"
