"""The programmatic API's run-directory guarantees."""

from pathlib import Path

import pytest

from semiseg import api
from semiseg.config import config_from_dict
from semiseg.errors import ConfigError


def tiny_config(tmp_path: Path):
    return config_from_dict({"name": "tiny", "out_dir": str(tmp_path / "runs"),
                             "data": {"size": [32, 32], "options": {"n": 30}, "cache_dir": str(tmp_path / "cache")},
                             "train": {"steps": 2, "progress": False}})


def test_a_kill_while_creating_the_run_directory_leaves_no_half_directory(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"

    def killed(path, text):  # the process dies after the splits, before config.yaml
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(api, "atomic_write_text", killed)
        with pytest.raises(KeyboardInterrupt):
            api.prepare(cfg, run_dir, fresh=True)
    assert list((tmp_path / "runs").iterdir()) == []  # so `semiseg train` (or the bench) can simply start it again
    ctx = api.prepare(cfg, run_dir, fresh=True)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "splits" / "labeled.txt").is_file()
    assert ctx.splits.labeled
    with pytest.raises(ConfigError, match="semiseg resume"):
        api.prepare(cfg, run_dir, fresh=True)  # a real run directory is never overwritten
