"""The programmatic API's run-directory guarantees."""

from pathlib import Path

import pytest

from semiseg import api, rundir
from semiseg.api import config_from_dict
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
        m.setattr(rundir, "atomic_write_text", killed)
        with pytest.raises(KeyboardInterrupt):
            api.prepare(cfg, run_dir, fresh=True)
    assert list((tmp_path / "runs").iterdir()) == []  # so `semiseg train` (or the bench) can simply start it again
    ctx = api.prepare(cfg, run_dir, fresh=True)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "splits" / "labeled.txt").is_file()
    assert ctx.splits.labeled
    with pytest.raises(ConfigError, match="semiseg resume"):
        api.prepare(cfg, run_dir, fresh=True)  # a real run directory is never overwritten


def test_oracle_is_supervised_with_every_label(tmp_path):
    """Same seed for initialisation, order and augmentation: with nothing unlabeled the two runs coincide."""
    import torch

    from semiseg.engine.checkpoint import load_checkpoint

    weights = {}
    for method in ("supervised", "oracle"):
        cfg = config_from_dict({"name": method, "out_dir": str(tmp_path / "runs"), "method": {"name": method},
                                "data": {"size": [32, 32], "options": {"n": 30}, "cache_dir": str(tmp_path / "c")},
                                "split": {"labeled": 1.0}, "model": {"decoder_channels": [16, 16, 8, 8, 8]},
                                "train": {"steps": 3, "eval_every": 3, "batch_size": 4, "progress": False}})
        api.run(cfg, log=lambda *_: None)
        stage = next((tmp_path / "runs" / method / "stages").iterdir())
        weights[method] = load_checkpoint(stage / "checkpoints" / "last.pt")["nets"]["model"]
    for name, tensor in weights["supervised"].items():
        torch.testing.assert_close(weights["oracle"][name], tensor, rtol=0, atol=0, msg=name)


def test_a_search_run_with_test_off_never_reads_the_test_images(tmp_path, monkeypatch):
    """``eval.test: false`` is for choosing hyper-parameters: validation only, no test figure anywhere."""
    from semiseg.evaluation import evaluator

    read = []
    real = evaluator.evaluate_source
    monkeypatch.setattr(evaluator, "evaluate_source", lambda model, source, stems, **kw: read.append(list(stems))
                        or real(model, source, stems, **kw))
    cfg = config_from_dict({**tiny_config(tmp_path).model_dump(mode="json"), "eval": {"test": False}})
    results = api.run(cfg, log=lambda *_: None)
    test_stems = (tmp_path / "runs" / "tiny" / "splits" / "test.txt").read_text().split()
    assert test_stems and results["test"] is None and results["val"]
    assert not any(set(stems) & set(test_stems) for stems in read)
    saved = api.run(config_from_dict({**cfg.model_dump(mode="json"), "name": "tiny-with-test",
                                      "eval": {"test": True}}), log=lambda *_: None)
    assert saved["test"] is not None and read[-1] == test_stems  # the switch is what kept test unread


def test_recorded_commands_carry_no_path_of_this_machine(tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"  # absolute, outside and inside the cwd
    here.mkdir()
    monkeypatch.chdir(here)
    argv = ["bench", "polyp", "--out-dir", f"{elsewhere}/bench-runs", "--set", f"data.root={elsewhere}/data",
            "--set", f"out_dir={here}/runs", "--set", "train.steps=10", "--seeds", "1"]
    assert api.recorded_command(argv) == ("semiseg bench polyp --out-dir bench-runs --set data.root=data "
                                          "--set out_dir=runs --set train.steps=10 --seeds 1")
    # the bench's session record lists its overrides the same way (they once kept data.root's absolute path)
    assert [api.portable_arg(o) for o in (f"data.root={elsewhere}/data", "train.threads=1")] == \
        ["data.root=data", "train.threads=1"]
