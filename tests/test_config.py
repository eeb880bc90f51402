"""Config: defaults, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from semiseg.api import load_config
from semiseg.config import apply_overrides, dump_config
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
    assert cfg.method.name == "supervised"
    assert cfg.model_dump()["method"] == {"name": "supervised", "loss": "run"}


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


def test_method_options_are_typed_at_load_and_dump_as_before(tmp_path):
    from semiseg.methods.fixmatch import FixMatchOptions

    cfg = load_config(None, ["method.name=fixmatch", "method.conf_threshold=0.9"])
    assert isinstance(cfg.method, FixMatchOptions) and cfg.method.name == "fixmatch"
    assert cfg.method.conf_threshold == 0.9
    dumped = cfg.model_dump(mode="json")["method"]  # config.yaml's shape: the name first, then the options
    assert list(dumped) == list(FixMatchOptions.model_fields)  # the base's name, then the declared order
    assert dumped == {"name": "fixmatch", **cfg.method.model_dump(mode="json")}
    assert "name" not in cfg.method.model_dump()  # the options alone (what stage keys hash) are unchanged
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


def test_the_config_layer_takes_its_method_lookup_as_an_argument():
    from semiseg import config as layer

    class Only(layer.MethodOptions):
        size: int = 3

    class Method:
        options_model = Only

        @classmethod
        def check_config(cls, config: layer.RunConfig, options: layer.MethodOptions) -> None:
            if config.train.steps < 10:
                raise ConfigError("needs train.steps >= 10")

    def lookup(name: str) -> type[Method]:
        if name != "only":
            raise KeyError(f"unknown method {name!r}; known: only")
        return Method

    cfg = layer.config_from_dict({"method": {"name": "only", "size": 4}, "model": {"weights": "none"}}, "x",
                                 methods=lookup)
    assert isinstance(cfg.method, Only) and cfg.method.size == 4
    with pytest.raises(ConfigError, match=r"^x: method\.name: unknown method 'nope'; known: only$"):
        layer.config_from_dict({"method": {"name": "nope"}}, "x", methods=lookup)
    with pytest.raises(ConfigError, match=r"^x: needs train\.steps >= 10$"):
        layer.config_from_dict({"method": {"name": "only"}, "train": {"steps": 2}}, "x", methods=lookup)
