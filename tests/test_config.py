"""Config: defaults, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from semiseg.config import apply_overrides, dump_config, load_config
from semiseg.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\ntrain:\n  lr: 0.01\n"),
                      ["train.steps=50", "data.size=[64,64]", "method.name=supervised"])
    assert cfg.name == "x" and cfg.train.lr == 0.01 and cfg.train.steps == 50
    assert tuple(cfg.data.size) == (64, 64)
    assert cfg.method == {"name": "supervised"}


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config(write(tmp_path, "train:\n  lrr: 0.1\n"))


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(write(tmp_path, "train:\n  steps: -3\n"))
    with pytest.raises(ConfigError, match=r"train\.optimizer"):
        load_config(None, ["train.optimizer=rmsprop"])


def test_unknown_method_and_method_option(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'nope'"):
        load_config(None, ["method.name=nope"])
    with pytest.raises(ConfigError, match=r"method\.bogus: unknown key"):
        load_config(None, ["method.name=supervised", "method.bogus=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=7", "name=r"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_override_into_non_section_rejected():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.y=1"])
