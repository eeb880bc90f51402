"""benchmarks/per_sequence.py: a finished run's test score split by video sequence adds up to the recorded one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench.scripts import load_script
from tests.safety_helpers import TINY


def test_the_sequence_is_the_stem_before_its_frame_number() -> None:
    script = load_script("per_sequence")
    assert script.sequence_of("0001TP_008550") == "0001TP"
    assert script.sequence_of("Seq05VD_f00210") == "Seq05VD"
    assert script.sequence_of("a_b_0001") == "a_b" and script.sequence_of("frame") == "frame"


def test_the_sequences_pool_to_the_recorded_score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg import api

    cfg = api.load_config(None, [*TINY, f"out_dir={tmp_path / 'runs'}", "name=sup",
                                 f"data.cache_dir={tmp_path / 'cache'}", "data.options.n=30",
                                 "data.options.kind=multiclass"])
    api.run(cfg, log=lambda *_: None)
    run = tmp_path / "runs" / "sup"
    script = load_script("per_sequence")
    test = (run / "splits" / "test.txt").read_text().split()
    # two made-up "videos" by the stem's parity: their confusion matrices must add up to the whole test split's
    monkeypatch.setattr(script, "sequence_of", lambda stem: "odd" if int(stem[-1]) % 2 else "even")
    row = script.by_sequence(run)
    assert sum(v["images"] for v in row["sequences"].values()) == len(test) and len(row["sequences"]) == 2
    recorded = json.loads((run / "results.json").read_text())["test"]["miou"]
    assert row["pooled"] == pytest.approx(recorded, abs=1e-6)
    # a part is not the whole: the per-video scores differ from the pooled one
    assert any(abs(v["miou"] - recorded) > 1e-6 for v in row["sequences"].values())
    md = script.table([row])
    assert md.splitlines()[0].startswith("| split seed | run | even (") and "| sup |" in md
