"""docs/adding-a-method.md, followed: its code blocks define and register two methods, which then train end to
end through the public API (stages, resume, delivered model, compute-matched steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from semiseg import api
from semiseg.api import config_from_dict
from semiseg.methods.registry import _REGISTRY, get_method

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding-a-method.md"
EXAMPLES = {"example-confident-st": ["0-supervised", "1-label", "2-student"],
            "example-pseudo-label": ["0-pseudo-label"]}


@pytest.fixture(scope="module")
def registered():
    """Execute every python block of the guide as a module would be imported; unregister afterwards."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2, "the guide shows one staged and one online method"
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), {"__name__": f"adding_a_method_{i}"})  # noqa: S102
    yield
    for name in EXAMPLES:
        _REGISTRY.pop(name, None)


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_the_guide_methods_train_end_to_end(registered, tmp_path: Path, method: str) -> None:
    cfg = config_from_dict({"name": method, "out_dir": str(tmp_path / "runs"),
                            "method": {"name": method, "threshold": 0.6},
                            "data": {"size": [32, 32], "options": {"n": 30}, "cache_dir": str(tmp_path / "cache")},
                            "model": {"weights": "none", "encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]},
                            "train": {"steps": 4, "eval_every": 2, "batch_size": 4, "progress": False}})
    assert get_method(method).options_model.__name__.endswith("Options")  # from Method[Options], not spelled
    results = api.run(cfg, log=lambda *_: None)
    run_dir = tmp_path / "runs" / method
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == EXAMPLES[method]
    assert results["test"]["headline"] is not None and results["trained_steps"] == 4
    if method == "example-confident-st":  # the threshold reached the label stage through its policy
        provenance = (run_dir / "stages" / "1-label" / "pseudo" / "provenance.json").read_text()
        assert '"threshold": 0.6' in provenance
    assert api.resume(run_dir, log=lambda *_: None)["test"] == results["test"]  # finished: nothing re-trained
    # the same config under another name in the same out_dir: every stage is reused (keys derived by the pipeline)
    again = api.run(cfg.model_copy(update={"name": f"{method}-again"}), log=lambda *_: None)
    for stage in EXAMPLES[method]:
        assert "reused_from" in (tmp_path / "runs" / f"{method}-again" / "stages" / stage / "DONE").read_text()
    assert again["test"] == results["test"]
