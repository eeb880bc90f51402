"""Run fingerprints: what counts as a change, what may move, and what an upgrade must not slip in."""

from pathlib import Path

import pytest

from semiseg.api import load_config
from semiseg.errors import RunChangedError
from semiseg.pipeline.integrity import check_run, config_changes, data_changes, new_options


def _cfg(*sets: str):
    return load_config(None, ["model.encoder=resnet18", "model.weights=none", *sets])


def test_a_folder_dataset_may_move_but_a_preset_may_not_change() -> None:
    recorded = _cfg("data.source=/old/place/mydata").model_dump(mode="json")
    assert config_changes(recorded, _cfg("data.source=/new/place/mydata")) == []  # the digests judge
    recorded = _cfg("data.source=kvasir-seg").model_dump(mode="json")
    assert config_changes(recorded, _cfg("data.source=cvc-clinicdb")) == [
        "data.source: 'kvasir-seg' -> 'cvc-clinicdb'"]


def test_options_added_by_a_newer_version_are_named() -> None:
    recorded = _cfg().model_dump(mode="json")
    del recorded["train"]["warmup"]
    assert config_changes(recorded, _cfg()) == []  # not a changed value ...
    assert new_options(recorded, _cfg()) == ["train.warmup = 0.05"]  # ... but an option the run never had


def test_a_mask_digest_that_was_never_recorded_is_not_a_change() -> None:
    before = {"unlabeled": {"a": ["i1", None], "b": ["i2", None]}, "val": {"c": ["i3", "m3"]}}
    now = {"unlabeled": {"a": ["i1", "m1"], "b": ["i2", "m2"]}, "val": {"c": ["i3", "m3x"]}}
    fatal, changed = data_changes(before, now)
    assert fatal == [] and changed == ["val: 1 mask(s) changed (c)"]


def test_a_missing_fingerprint_stops_resume_and_evaluate_unless_evaluate_accepts_it(tmp_path: Path) -> None:
    cfg = _cfg()
    notes: list[str] = []
    for command in ("resume", "evaluate"):  # deleting one file must not bypass the checks
        with pytest.raises(RunChangedError, match="fingerprint.json is missing"):
            check_run(tmp_path, cfg, None, None, names=(), accept_changed_data=False, command=command)  # type: ignore[arg-type]
    with pytest.raises(RunChangedError, match="--accept-missing-fingerprint"):
        check_run(tmp_path, cfg, None, None, names=(), accept_changed_data=False, command="evaluate")  # type: ignore[arg-type]
    check_run(tmp_path, cfg, None, None, names=(), accept_changed_data=False, command="evaluate",  # type: ignore[arg-type]
              accept_missing_fingerprint=True, log=notes.append)
    check_run(tmp_path, cfg, None, None, names=(), accept_changed_data=False, command="predict",  # type: ignore[arg-type]
              log=notes.append)
    assert len(notes) == 2 and all("not checked" in n and "older semiseg" not in n for n in notes)
