"""Benchmark result arithmetic: merging partial runs, gap recovered, mean ± std, the markdown table."""

import json
import math
import re
from datetime import UTC, datetime

import pytest
import torch

from semiseg.bench.matrix import bench_spec, expected_seconds, record, record_session, run_config
from semiseg.bench.tables import (
    budget_of,
    entry_from_results,
    gap_recovered,
    invalid_seeds,
    load_entries,
    load_sessions,
    matrix_wall_clock,
    merge,
    save_entries,
    summarize,
    write_benchmarks_md,
)


def entry(method, seed, test, **kw):
    return {"protocol": "p", "method": method, "split_seed": seed, "seed": 0, "test": test,
            "headline_metric": "dice", "wall_seconds": 60.0, "peak_rss_mb": 100.0, "commit": "abc",
            "command": f"semiseg bench p --methods {method}", **kw}


def test_gap_recovered_hand_values():
    assert gap_recovered(0.75, 0.70, 0.80) == pytest.approx(0.5)
    assert gap_recovered(0.65, 0.70, 0.80) == pytest.approx(-0.5)
    assert gap_recovered(0.75, 0.70, 0.70) is None  # no gap to recover
    assert gap_recovered(0.75, 0.80, 0.70) is None


def test_validity_gate_drops_seeds_whose_oracle_is_within_three_points(tmp_path):
    # seed 0: oracle +10 pts (valid); seed 1: oracle +2.9 pts (invalid); seed 2: oracle below supervised
    entries = [entry("supervised", 0, 0.60), entry("oracle", 0, 0.70), entry("st++", 0, 0.65),
               entry("supervised", 1, 0.60), entry("oracle", 1, 0.629), entry("st++", 1, 0.62),
               entry("supervised", 2, 0.60), entry("oracle", 2, 0.59), entry("st++", 2, 0.70)]
    assert set(invalid_seeds(entries, "p")) == {1, 2}
    st = {r["method"]: r for r in summarize(entries, "p")}["st++"]
    assert st["gap_mean"] == pytest.approx(0.5) and st["gap_seeds"] == [0]  # seed 0 only
    assert st["gain_mean"] == pytest.approx((0.05 + 0.02 + 0.10) / 3)  # gains still use every seed
    results = tmp_path / "results"
    results.mkdir()
    save_entries(results / "p.json", entries)
    md = write_benchmarks_md(results, tmp_path / "B.md").read_text()
    assert "**split seed 1 invalid**: oracle 62.9 vs supervised 60.0: +2.9 pts, below the 3-point validity gate" in md
    assert "**split seed 2 invalid**" in md and "split seed 0 invalid" not in md
    assert "| 50 % (seed 0) |" in md


def test_merge_combines_sessions_and_newer_wins(tmp_path):
    path = tmp_path / "p.json"
    save_entries(path, merge([], [entry("supervised", 0, 0.70), entry("oracle", 0, 0.80)]))
    # a later session adds seed 1 and re-runs supervised seed 0
    save_entries(path, merge(load_entries(path), [entry("supervised", 1, 0.60), entry("supervised", 0, 0.71)]))
    entries = load_entries(path)
    assert len(entries) == 3
    assert {(e["method"], e["split_seed"]): e["test"] for e in entries}[("supervised", 0)] == 0.71


def test_merging_a_stale_result_file_never_hides_a_newer_run(tmp_path):
    from tests.cli_helpers import semiseg

    results, other = tmp_path / "benchmarks" / "results", tmp_path / "other"
    session = {"seeds": [0], "methods": ["mt"], "executed": 1, "read_back": 0, "failed": [], "elapsed_seconds": 60.0,
               "cpu_cores": 2, "overrides": [], "commit": "abc", "finished": "2026-11-02T10:00:00Z",
               "command": "semiseg bench p --methods mt"}
    save_entries(results / "p.json", [entry("supervised", 0, 0.70, finished="2026-11-01T10:00:00Z"),
                                      entry("mt", 0, 0.75, finished="2026-11-03T10:00:00Z")])
    save_entries(other / "p.json", [entry("supervised", 0, 0.71, finished="2026-11-02T10:00:00Z"),
                                    entry("mt", 0, 0.60, finished="2026-11-02T10:00:00Z"),  # stale: re-run since
                                    entry("mt", 1, 0.65)], [session])
    for _ in range(2):  # merging twice adds nothing the second time
        proc = semiseg(["bench", "merge", str(other / "p.json")], tmp_path)
    assert "0 rows taken, 0 bench sessions added" in proc.stdout
    got = {(e["method"], e["split_seed"]): e["test"] for e in load_entries(results / "p.json")}
    assert got == {("supervised", 0): 0.71, ("mt", 0): 0.75, ("mt", 1): 0.65}
    assert load_sessions(results / "p.json") == [session]
    assert "`mt`" in (tmp_path / "BENCHMARKS.md").read_text()
    (other / "camvid.json").write_text((other / "p.json").read_text())  # rows of protocol p under another name
    proc = semiseg(["bench", "merge", str(other / "camvid.json")], tmp_path, check=False)
    assert proc.returncode != 0 and "holds protocol(s) ['p'], not 'camvid'" in proc.stderr
    assert not (results / "camvid.json").exists()


def test_summarize_mean_std_gain_and_gap():
    entries = [entry("supervised", 0, 0.70), entry("supervised", 1, 0.60),
               entry("oracle", 0, 0.80), entry("oracle", 1, 0.80),
               entry("st++", 0, 0.75), entry("st++", 1, 0.70, pseudo_label_quality=0.9)]
    rows = {r["method"]: r for r in summarize(entries, "p")}
    st = rows["st++"]
    assert st["test_mean"] == pytest.approx(0.725)
    assert st["test_std"] == pytest.approx(math.sqrt(((0.025) ** 2 * 2) / 1))
    assert st["gain_mean"] == pytest.approx(0.075)  # (+0.05, +0.10)
    assert st["gap_mean"] == pytest.approx((0.5 + 0.5) / 2)  # 0.05/0.10 and 0.10/0.20
    assert st["beats_supervised"] is True and st["pl_quality"] == pytest.approx(0.9)
    assert rows["supervised"]["beats_supervised"] is None
    assert list(rows)[:2] == ["supervised", "oracle"]


def test_method_worse_than_supervised_is_flagged(tmp_path):
    entries = [entry("supervised", 0, 0.70), entry("oracle", 0, 0.80), entry("mt", 0, 0.65)]
    save_entries(tmp_path / "results" / "p.json", entries)
    md = write_benchmarks_md(tmp_path / "results", tmp_path / "B.md").read_text()
    assert "| `mt` |" in md and "**no**" in md and "-5.0" in md and "-50 %" in md


def test_bench_sessions_survive_entry_merges_and_reach_the_tables(tmp_path):
    path = tmp_path / "results" / "p.json"
    record_session(path, {"seeds": [0], "methods": ["supervised", "mt"], "executed": 2, "read_back": 0,
                          "failed": [], "elapsed_seconds": 5400.0, "cpu_cores": 2, "commit": "abc",
                          "command": "semiseg bench p --seeds 0"})
    record(path, entry("supervised", 0, 0.70))  # a later entry merge keeps the session
    assert len(load_sessions(path)) == 1 and len(load_entries(path)) == 1
    md = write_benchmarks_md(tmp_path / "results", tmp_path / "B.md").read_text()
    assert "| 0 | 2 | 2 / 0 / 0 / 0 | 90.0 min | 2 | abc | `semiseg bench p --seeds 0` |" in md


def session(seed, methods, start_min, minutes, **kw):
    end = 1_800_000_000 + 60 * (start_min + minutes)
    finished = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%dT%H:%M:%S%z")
    return {"seeds": [seed], "methods": methods, "executed": len(methods), "read_back": 0, "failed": [],
            "elapsed_seconds": 60.0 * minutes, "cpu_cores": 2, "commit": "abc", "finished": finished,
            "command": "semiseg bench p", **kw}


def test_matrix_wall_clock_spans_benches_run_side_by_side():
    methods = {"supervised", "oracle", "mt"}
    sessions = [session(0, ["supervised", "mt"], 0, 40), session(0, ["oracle"], 1, 30),  # side by side: 40 min
                session(0, ["mt"], 100, 20),  # a later re-run of one method: not a whole matrix
                session(1, ["supervised", "oracle", "mt"], 0, 50),  # one process
                session(2, ["supervised", "oracle"], 0, 10), session(2, ["mt"], 20, 10),  # one after another
                session(3, ["supervised", "oracle", "mt"], 0, 5, read_back=2)]  # cost paid in an earlier session
    lines = matrix_wall_clock(sessions, {0: methods, 1: methods, 2: methods, 3: methods})
    assert lines[2] == ("- split seed 0: all 3 methods in 40.0 min wall clock (2 bench processes side by side on "
                        "2 cores, commit abc)")
    assert lines[3] == "- split seed 1: all 3 methods in 50.0 min wall clock (1 bench process on 2 cores, commit abc)"
    assert len(lines) == 5 and matrix_wall_clock(sessions[2:3], {0: methods}) == []
    # a row added later to seed 0 only: seed 0 has no whole-matrix time any more, seed 1 keeps its own
    later = matrix_wall_clock(sessions, {0: methods | {"new"}, 1: methods})
    assert [line for line in later if line.startswith("- ")] == [lines[3]]


def test_an_entry_may_run_another_method_under_its_own_row(tmp_path):
    # a compute-matched control: supervised, trained longer, as a row of its own
    cfg = run_config("demo", "supervised-2x", {"method": "supervised", "set": ["train.steps=14"]}, 1, tmp_path, [])
    assert cfg.method.name == "supervised" and cfg.train.steps == 14 and cfg.name == "demo-s1-supervised-2x"
    results = {"method": "supervised", "split_seed": 1, "test": {"headline": 0.75}, "val_metric": "dice"}
    row = entry_from_results("p", results, entry="supervised-2x")
    assert (row["method"], row["algorithm"]) == ("supervised-2x", "supervised")
    rows = {r["method"]: r for r in summarize([entry("supervised", 1, 0.70), entry("oracle", 1, 0.80),
                                               {**row, "wall_seconds": 60.0, "peak_rss_mb": 1.0}], "p")}
    assert rows["supervised-2x"]["gain_mean"] == pytest.approx(0.05)  # a row against supervised, not its baseline


def test_eta_uses_the_method_time_of_other_seeds_else_the_runs_done():
    known = [entry("st++", 0, 0.7, wall_seconds=600.0), entry("st++", 1, 0.7, wall_seconds=800.0),
             entry("supervised", 0, 0.7, wall_seconds=100.0)]
    assert expected_seconds("st++", known, [50.0]) == pytest.approx(700.0)
    assert expected_seconds("gta-seg", known, [50.0, 150.0]) == pytest.approx(100.0)
    assert expected_seconds("gta-seg", known, []) == pytest.approx(1500.0 / 3)
    assert expected_seconds("gta-seg", [], []) == 0.0


@pytest.mark.parametrize("protocol", ["polyp", "camvid", "demo"])
def test_every_bundled_bench_entry_is_a_valid_run_config(protocol, tmp_path):
    # a matrix entry the protocol's config cannot support must fail here, not hours into a bench
    spec = bench_spec(protocol)
    for method, options in spec["methods"].items():
        for seed in spec.get("seeds", [0]):
            cfg = run_config(protocol, method, options or {}, seed, tmp_path, [])
            assert cfg.method.name == (options or {}).get("method", method) and cfg.split.seed == seed


def test_tables_show_the_recorded_budget_and_the_hand_written_reading(tmp_path):
    results = tmp_path / "results"
    save_entries(results / "p.json", [entry("supervised", 0, 0.7, budget="96x96 px, Unet-resnet18, 400 steps"),
                                      entry("oracle", 1, 0.8)])
    md = write_benchmarks_md(results, tmp_path / "B.md").read_text()
    assert "Budget: 96x96 px, Unet-resnet18, 400 steps; not recorded." in md
    assert "split seeds 0, 1" in md and "Reading the" not in md
    (results / "p-notes.md").write_text("The oracle of seed 0 collapsed.\n")
    md = write_benchmarks_md(results, tmp_path / "B.md").read_text()
    assert "### Reading the `p` results (hand-written" in md and "The oracle of seed 0 collapsed." in md


def test_budget_line_from_a_run_config():
    from semiseg.api import load_config

    cfg = load_config("polyp")
    h, w = cfg.data.size
    assert budget_of(cfg) == (f"{h}x{w} px, Unet-efficientnet-lite0 (weights imagenet), {cfg.train.steps} steps "
                              f"x batch {cfg.train.batch_size} per training")


def test_a_failing_run_does_not_stop_the_bench_but_fails_its_exit(tmp_path, monkeypatch):
    from semiseg import api
    from semiseg.bench.matrix import BenchError, run_bench

    def fake_finish(cfg, **_):
        if cfg.name == "demo-s0-oracle":
            raise RuntimeError("out of memory")
        return {"method": cfg.method.name, "split_seed": cfg.split.seed, "val_metric": "dice",
                "test": {"headline": 0.5}, "name": cfg.name}, True

    monkeypatch.setattr(api, "finish", fake_finish)
    results = tmp_path / "r" / "demo.json"
    with pytest.raises(BenchError, match="1 of 4 runs failed") as err:
        run_bench("demo", methods=["oracle", "supervised"], seeds=[0, 1], out_dir=tmp_path / "b",
                  results_path=results, log=lambda *_: None)
    assert "demo-s0-oracle: RuntimeError: out of memory" in str(err.value)
    assert {(e["method"], e["split_seed"]) for e in load_entries(results)} == {  # the others ran
        ("supervised", 0), ("oracle", 1), ("supervised", 1)}
    (session,) = load_sessions(results)
    assert (session["executed"], session["failed"]) == (3, ["demo-s0-oracle: RuntimeError: out of memory"])


def test_a_run_made_with_another_config_is_not_read_back(tmp_path):
    import yaml

    from semiseg.api import config_from_dict
    from semiseg.bench.matrix import config_drift, run_bench
    from semiseg.config import dump_config
    from semiseg.errors import ConfigError

    cfg = run_config("demo", "supervised", {}, 0, tmp_path / "b", [])
    run_dir = tmp_path / "b" / cfg.name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "results.json").write_text("{}")
    assert config_drift(run_dir, cfg) == []
    # where it ran does not matter ...
    assert config_drift(run_dir, run_config("demo", "supervised", {}, 0, tmp_path / "b",
                                            ["train.threads=1", "data.cache_dir=/x"])) == []
    # ... nor a field added to the config since, at its default (the old run computed the same)
    older = yaml.safe_load(dump_config(cfg))
    del older["eval"]["test"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(older))
    assert config_drift(run_dir, cfg) == []
    assert config_drift(run_dir, config_from_dict({**cfg.model_dump(mode="json"), "eval": {"test": False}})) == [
        "eval.test: True -> False"]
    # ... what it computed does
    with pytest.raises(ConfigError, match=r"demo-s0-supervised: train.steps: \d+ -> 7"):
        run_bench("demo", methods=["supervised"], seeds=[0], out_dir=tmp_path / "b",
                  results_path=tmp_path / "r.json", overrides=["train.steps=7"], log=lambda *_: None)
    assert not (tmp_path / "r.json").exists()  # refused before running anything


def test_a_matrix_entry_sets_its_own_config_and_the_command_still_wins(tmp_path):
    entry_options = {"set": ["train.steps=1600", "train.eval_every=100"]}
    cfg = run_config("demo", "oracle", entry_options, 0, tmp_path, [], ["train.steps=5"])
    assert cfg.train.steps == 1600 and cfg.train.eval_every == 100  # the entry beats the spec-wide override
    cfg = run_config("demo", "oracle", entry_options, 0, tmp_path, ["train.steps=7"], ["train.steps=5"])
    assert cfg.train.steps == 7 and cfg.model_dump()["method"] == {"name": "oracle"}  # the command beats both
    assert entry_options == {"set": ["train.steps=1600", "train.eval_every=100"]}  # the spec is not consumed


def test_gap_recovered_names_the_seeds_it_rests_on(tmp_path):
    entries = [entry("supervised", 0, 0.70), entry("oracle", 0, 0.65),  # seed 0: the oracle lost, no gap
               entry("supervised", 1, 0.60), entry("oracle", 1, 0.80),
               entry("mt", 0, 0.72), entry("mt", 1, 0.70)]
    rows = {r["method"]: r for r in summarize(entries, "p")}
    assert rows["mt"]["gap_mean"] == pytest.approx(0.5) and rows["mt"]["gap_seeds"] == [1]
    assert rows["oracle"]["gap_mean"] is None  # a baseline's own gap (0 % / 100 %) says nothing
    save_entries(tmp_path / "r" / "p.json", entries)
    md = write_benchmarks_md(tmp_path / "r", tmp_path / "B.md").read_text()
    assert "| 50 % (seed 1) |" in md


def test_each_method_gains_over_its_own_compute_matched_control(tmp_path):
    # controls: supervised (1000 steps), supervised-2x (2000); dst-cbc's net trained 2000 steps, self-learning's
    # 1500 (no such control: the next longer one, supervised-2x, stands in), atso's 3000 (none at least that
    # long), mean-teacher's 1000 (its control is supervised itself)
    sup = {"algorithm": "supervised"}
    entries = [entry("supervised", 0, 0.60, trained_steps=1000, **sup),
               entry("supervised", 1, 0.50, trained_steps=1000, **sup),
               entry("supervised-2x", 0, 0.66, trained_steps=2000, **sup),
               entry("supervised-2x", 1, 0.58, trained_steps=2000, **sup),
               entry("oracle", 0, 0.80, trained_steps=1000), entry("oracle", 1, 0.70, trained_steps=1000),
               entry("dst-cbc", 0, 0.65, trained_steps=2000), entry("dst-cbc", 1, 0.61, trained_steps=2000),
               entry("self-learning", 0, 0.64, trained_steps=1500), entry("atso", 0, 0.67, trained_steps=3000),
               entry("mean-teacher", 0, 0.62, trained_steps=1000), entry("mean-teacher", 1, 0.49, trained_steps=1000),
               entry("st++", 0, 0.70),  # recorded before trained_steps existed: no control known
               # supervised variants (another loss) are no controls, however long, and have their own control
               entry("supervised-dice", 0, 0.63, trained_steps=1000, method_options={"loss": "dice"}, **sup),
               entry("supervised-dice-2x", 0, 0.90, trained_steps=2000, method_options={"loss": "dice"}, **sup)]
    rows = {r["method"]: r for r in summarize(entries, "p")}
    dst = rows["dst-cbc"]
    assert dst["gain_mean"] == pytest.approx((0.05 + 0.11) / 2)  # vs supervised: +5, +11
    assert dst["control"] == "supervised-2x"
    assert dst["control_gain_mean"] == pytest.approx((-0.01 + 0.03) / 2)  # vs supervised-2x: -1, +3
    assert dst["control_gain_std"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    mt = rows["mean-teacher"]
    assert mt["control"] == "supervised" and mt["control_gain_mean"] == pytest.approx(mt["gain_mean"])
    assert mt["control_gain_mean"] == pytest.approx((0.02 - 0.01) / 2)
    sl = rows["self-learning"]
    assert sl["control"] == "supervised-2x" and sl["control_gain_mean"] == pytest.approx(-0.02)
    assert rows["atso"]["control"] == "none at 3000 steps" and rows["atso"]["control_gain_mean"] is None
    assert rows["st++"]["control"] is None
    assert rows["supervised-dice"]["control"] == "supervised"
    assert rows["supervised-dice"]["control_gain_mean"] == pytest.approx(0.03)
    assert rows["supervised-dice-2x"]["control"] == "supervised-2x"
    for name in ("supervised", "supervised-2x", "oracle"):
        assert rows[name]["control"] is None, name
    save_entries(tmp_path / "results" / "p.json", entries)
    md = write_benchmarks_md(tmp_path / "results", tmp_path / "B.md").read_text()
    assert "| own control | gain vs own control (pts) |" in md
    assert "| `dst-cbc` | 0,1 | 63.0 ± 2.8 | +8.0 ± 4.2 | `supervised-2x` | +1.0 ± 2.8 | " in md
    assert "| `self-learning` | 0 | 64.0 | +4.0 | `supervised-2x` | -2.0 | " in md
    assert "| `atso` | 0 | 67.0 | +7.0 | none at 3000 steps |  | " in md


def test_trained_steps_reach_the_bench_entry():
    results = {"method": "dst-cbc", "split_seed": 0, "test": {"headline": 0.6}, "val_metric": "dice",
               "trained_steps": 2000}
    assert entry_from_results("p", results)["trained_steps"] == 2000
    assert entry_from_results("p", {**results, "method_options": {"loss": "dice"}})["method_options"] == \
        {"loss": "dice"}


@pytest.mark.parametrize("protocol,labeled,unlabeled", [("polyp", 65, 1180), ("camvid", 46, 321)])
def test_every_bench_method_has_its_compute_matched_control(protocol, labeled, unlabeled, tmp_path):
    """A method whose delivered net trains longer than `supervised` needs a supervised row of as many steps
    (split sizes about the protocol's: ST/ST++'s default epoch rule depends on them)."""
    from semiseg.data.classes import ClassTable
    from semiseg.data.splits import Splits
    from semiseg.data.types import DataSource
    from semiseg.methods.registry import get_method
    from semiseg.pipeline.context import RunContext

    spec = bench_spec(protocol)
    source = DataSource("fake", None, ClassTable.binary("obj"), [], lambda p: None)
    splits = Splits(labeled=[f"l{i}" for i in range(labeled)], unlabeled=[f"u{i}" for i in range(unlabeled)])
    controls, needs = set(), {}
    for name, options in spec["methods"].items():
        cfg = run_config(protocol, name, options or {}, 0, tmp_path, [])
        if cfg.method.name == "supervised":
            controls.add(cfg.train.steps)
        elif cfg.method.name != "oracle":
            run = RunContext(cfg, tmp_path / name, source, splits, torch.device("cpu"))
            needs[name] = get_method(cfg.method.name)(run, cfg.method).trained_steps()
    assert {name: steps for name, steps in needs.items() if steps not in controls} == {}
    # issue 25 (both protocols, issue 29): the ATSO family's students of 2x, self-learning fine-tuned for 1x
    budget = run_config(protocol, "supervised", {}, 0, tmp_path, []).train.steps
    assert needs["self-training"] == needs["st++"] == needs["dst-cbc"] == needs["stso"] == 2 * budget
    assert needs["atso"] == needs["self-learning"] == 2 * budget
    assert needs["st++match"] == 3 * budget  # ST++'s student 2x, then its online stage 1x
    assert needs["ensemble-st"] == 2 * budget  # a student from scratch, as long as ST++'s


def test_a_supervised_control_row_is_a_baseline_not_a_method():
    entries = [entry("supervised", 0, 0.60), entry("oracle", 0, 0.70),
               entry("supervised-2x", 0, 0.58, algorithm="supervised"), entry("st++", 0, 0.65)]
    rows = {r["method"]: r for r in summarize(entries, "p")}
    control = rows["supervised-2x"]
    assert control["gain_mean"] == pytest.approx(-0.02)  # still shown against supervised
    assert control["gap_mean"] is None and control["beats_supervised"] is None
    assert list(rows) == ["supervised", "oracle", "supervised-2x", "st++"]
    assert rows["st++"]["gap_mean"] == pytest.approx(0.5) and rows["st++"]["beats_supervised"] is True


def test_a_supervised_row_recorded_before_trained_steps_pairs_by_its_budget():
    old = {"trained_steps": None, "budget": "128x128 px, Unet-efficientnet-lite0 (weights imagenet), 2000 steps x "
                                            "batch 8 per training"}
    entries = [entry("supervised", 0, 0.60, trained_steps=None, budget=old["budget"].replace("2000", "1000")),
               entry("supervised-2x", 0, 0.62, algorithm="supervised", **old),
               entry("self-learning", 0, 0.66, trained_steps=2000)]
    row = {r["method"]: r for r in summarize(entries, "p")}["self-learning"]
    assert row["control"] == "supervised-2x" and row["control_gain_mean"] == pytest.approx(0.04)


def claim_entries():
    """Split seeds 0-2 pass the validity gate (oracle +10 pts), seed 3 fails it (+2), seed 4 has no oracle."""
    base = [entry(m, s, t) for s in (0, 1, 2) for m, t in (("supervised", 0.60), ("oracle", 0.70))]
    base += [entry("supervised", 3, 0.60), entry("oracle", 3, 0.62), entry("supervised", 4, 0.60)]
    rows = {"gta-seg": (0.66, 0.64, 0.61), "mean-teacher": (0.62, 0.63, 0.62),  # +4, +1, -1: confirmed
            "self-training": (0.62, 0.61, 0.62), "dst-cbc": (0.70, 0.60, 0.61),  # +8, -1, -1: 1 of 3 ahead
            "st++": (0.616, 0.611, 0.614),  # vs self-training -0.4, +0.1, -0.6: mean -0.3, within noise
            "stso": (0.614, 0.604, 0.614),  # vs self-learning -0.6 on each seed: beyond noise
            "self-learning": (0.62, 0.61, 0.62)}
    base += [entry(m, s, t) for m, ts in rows.items() for s, t in enumerate(ts)]
    base += [entry("atso", 0, 0.65),  # one common seed with stso: pending
             entry("momentum-pl", 0, 0.70), entry("momentum-pl", 1, 0.72),  # no offline row: pending, 0 seeds
             entry("gta-seg", 3, 0.90), entry("mean-teacher", 3, 0.10),  # a seed the gate leaves out
             entry("mean-teacher", 4, 0.10)]  # a seed without an oracle
    return base


def test_claims_verdicts_by_hand():
    from semiseg.bench.claims import CLAIMS, check, seeds_passing_gate

    entries = claim_entries()
    assert seeds_passing_gate(entries, "p") == ([0, 1, 2], {3: "gate", 4: "no oracle"})
    result = {(c.better, c.other): check(entries, "p", c) for c in CLAIMS}
    gta = result["gta-seg", "mean-teacher"]
    assert gta["seeds"] == [0, 1, 2] and gta["excluded"] == {3: "gate", 4: "no oracle"}
    assert gta["diff"] == pytest.approx((0.04 + 0.01 - 0.01) / 3) and gta["ahead"] == 2
    assert gta["verdict"] == "confirmed"
    dst = result["dst-cbc", "self-training"]  # mean +2 points but ahead on 1 of 3 seeds only
    assert dst["diff"] == pytest.approx(0.02) and dst["ahead"] == 1 and dst["verdict"] == "not confirmed"
    st = result["st++", "self-training"]  # a "≥" claim 0.3 points behind: within noise
    assert st["diff"] == pytest.approx(-0.003) and st["ahead"] == 1 and st["verdict"] == "confirmed (within noise)"
    stso = result["stso", "self-learning"]  # a "≥" claim 0.6 points behind: beyond noise
    assert stso["diff"] == pytest.approx(-0.006) and stso["ahead"] == 0 and stso["verdict"] == "not confirmed"
    atso = result["atso", "stso"]
    assert atso["seeds"] == [0] and atso["diff"] == pytest.approx(0.036) and atso["verdict"] == "pending (1 seed)"
    mpl = result["momentum-pl", "momentum-pl-offline"]
    assert mpl["seeds"] == [] and mpl["diff"] is None and mpl["verdict"] == "pending (0 seeds)"
    assert result["dst-cbc", "dst-no-cbc"]["verdict"] == "pending (0 seeds)"


def test_claims_thresholds_are_inclusive_where_the_rule_says_so():
    from semiseg.bench.claims import Claim, check

    gate = [entry(m, s, t) for s in (0, 1) for m, t in (("supervised", 0.60), ("oracle", 0.70))]
    at_least, beats = Claim("a ≥ b", "x", "a", "b", "≥"), Claim("a > b", "x", "a", "b")
    # exactly 0.5 points behind on both seeds (0.615 - 0.62 is a hair below -0.005 in floating point)
    half = gate + [entry("a", 0, 0.615), entry("a", 1, 0.605), entry("b", 0, 0.62), entry("b", 1, 0.61)]
    assert check(half, "p", at_least)["verdict"] == "confirmed (within noise)"
    assert check(half, "p", beats)["verdict"] == "not confirmed"
    # ahead on 1 of 2 seeds is no majority, even with a positive mean; a tie is not ahead
    split = gate + [entry("a", 0, 0.70), entry("a", 1, 0.61), entry("b", 0, 0.62), entry("b", 1, 0.61)]
    result = check(split, "p", beats)
    assert result["ahead"] == 1 and result["diff"] == pytest.approx(0.04) and result["verdict"] == "not confirmed"
    assert check(split, "p", at_least)["verdict"] == "confirmed (within noise)"


def test_claims_section_in_benchmarks_md(tmp_path):
    results = tmp_path / "results"
    save_entries(results / "p.json", claim_entries())
    md = write_benchmarks_md(results, tmp_path / "B.md").read_text()
    section = md[md.index("## The papers' own claims, checked"):]
    assert "≥ −0.5 points, i.e. within noise" in section and "fewer than 2 common seeds" in section
    assert ("| GTA-Seg beats mean teacher (GTA-Seg, Table 4) | `p` (Dice) | 0,1,2; seed 3 out: gate; seed 4 out: "
            "no oracle | `gta-seg`: 63.7 ± 2.5 | `mean-teacher`: 62.3 ± 0.6 | +1.33 | 2 of 3 | **confirmed** |"
            ) in section
    assert "| `st++`: 61.4 ± 0.3 | `self-training`: 61.7 ± 0.6 | -0.30 | 1 of 3 | **confirmed** (within noise) |" \
        in section
    assert "| `dst-cbc`: 63.7 ± 5.5 | `self-training`: 61.7 ± 0.6 | +2.00 | 1 of 3 | **not confirmed** |" in section
    assert "| 0 | `atso`: 65.0 | `stso`: 61.4 | +3.60 | 1 of 1 | pending (1 seed) |" in section
    assert ("| none | `momentum-pl`: 71.0 ± 1.4 (seeds 0,1) | `momentum-pl-offline`: no row |  |  | "
            "pending (0 seeds) |") in section
    assert "| none | `dst-cbc`: 63.7 ± 5.5 (seeds 0,1,2) | `dst-no-cbc`: no row |  |  | pending (0 seeds) |" in section
    assert "- `dst-no-cbc`: `dst-cbc` with `ratios: [1.0, 1.0, 1.0, 1.0, 1.0]`" in section
    assert md == write_benchmarks_md(results, tmp_path / "B.md").read_text()  # deterministic


@pytest.mark.parametrize("protocol", ["polyp", "camvid"])
def test_every_claim_has_its_rows_in_the_bench_matrix(protocol, tmp_path):
    from semiseg.bench.claims import CLAIMS, VARIANTS

    spec = bench_spec(protocol)["methods"]
    assert {c.better for c in CLAIMS} | {c.other for c in CLAIMS} <= set(spec)
    assert set(VARIANTS) <= set(spec)
    # a named variant runs its method with the paper's ablation option (validated by the method's options)
    offline = run_config(protocol, "momentum-pl-offline", spec["momentum-pl-offline"], 0, tmp_path, [])
    assert offline.name == f"{protocol}-s0-momentum-pl-offline" and offline.method.name == "momentum-pl"
    assert offline.method.teacher_update == "offline"
    assert offline.method.pseudo_from == "momentum"  # only the teacher update differs
    online = run_config(protocol, "momentum-pl", spec["momentum-pl"], 0, tmp_path, []).method
    assert online.teacher_update == "online"
    assert offline.method.model_dump(exclude={"teacher_update"}) == online.model_dump(
        exclude={"teacher_update"})
    no_cbc = run_config(protocol, "dst-no-cbc", spec["dst-no-cbc"], 0, tmp_path, []).method
    assert no_cbc.ratios == [1.0] * 5
    assert no_cbc.model_dump(exclude={"ratios"}) == run_config(
        protocol, "dst-cbc", spec["dst-cbc"], 0, tmp_path, []).method.model_dump(exclude={"ratios"})


@pytest.mark.parametrize("protocol", ["polyp", "camvid"])
def test_controls_train_the_multiple_of_the_budget_their_names_say(protocol, tmp_path):
    # a protocol's budget moved without its controls would pair every method with the wrong control
    spec = bench_spec(protocol)
    budget = run_config(protocol, "supervised", {}, 0, tmp_path, []).train.steps
    multiples = {name: float(name.split("-")[1].rstrip("x")) for name in spec["methods"]
                 if re.fullmatch(r"supervised-[0-9.]+x", name)}
    multiples["oracle"] = 4.0  # BENCHMARK.md: the oracle trains 4x the budget
    assert {"supervised-2x", "supervised-3x"} <= multiples.keys()
    for name, multiple in multiples.items():
        cfg = run_config(protocol, name, spec["methods"][name] or {}, 0, tmp_path, [])
        assert cfg.train.steps == round(multiple * budget), name


def test_budget_line_names_the_protocol_budget_then_the_longer_controls():
    from semiseg.bench.tables import budget_line

    size = "96x128 px, Unet-efficientnet-lite0 (weights imagenet), {} steps x batch 8 per training"
    rows = [entry("supervised", 0, 0.5, budget=size.format(2000)), entry("oracle", 0, 0.6, budget=size.format(8000)),
            entry("supervised-2x", 0, 0.5, budget=size.format(4000)), entry("st++", 0, 0.5, budget=size.format(2000))]
    assert budget_line(rows) == f"Budget: {size.format(2000)} (other step counts: 4000, 8000, for the controls and " \
                                "the oracle)."
    assert budget_line([*rows, entry("x", 0, 0.5, budget="64x64 px, Unet-resnet18, 10 steps x batch 2 per training")]) \
        .endswith("the oracle); 64x64 px, Unet-resnet18, 10 steps x batch 2 per training.")


def test_side_measurements_are_shown_beside_the_protocols_not_read_as_one(tmp_path):
    results = tmp_path / "results"
    save_entries(results / "p.json", [entry("supervised", 0, 0.7)])
    (results / "p-al.json").write_text(json.dumps({"protocol": "p", "k": 3, "rows": [
        {"arm": "start", "command": "python benchmarks/active_learning.py --k 3", "commit": "abc"}]}))
    (results / "p-al.md").write_text("| method | arm |\n|---|---|\n| supervised | uncertain |\n")
    md = write_benchmarks_md(results, tmp_path / "B.md").read_text()
    assert "## `p`" in md and "## `p-al`" not in md
    assert "## Which images to label next: `p`" in md and "| supervised | uncertain |" in md
    assert "- `python benchmarks/active_learning.py --k 3` (commit abc)" in md


def test_wall_time_timed_before_the_stage_clock_is_marked_a_lower_bound(tmp_path):
    results = {"method": "st++", "split_seed": 0, "test": {"headline": 0.7}, "stage_seconds": 120.0,
               "stage_seconds_all_sessions": True}
    assert entry_from_results("p", results)["wall_all_sessions"] is True
    assert entry_from_results("p", {**results, "stage_seconds_all_sessions": False})["wall_all_sessions"] is False
    entries = [entry("supervised", 0, 0.6, wall_all_sessions=True), entry("oracle", 0, 0.8, wall_all_sessions=True),
               entry("st++", 0, 0.7, wall_all_sessions=True), entry("st++", 1, 0.7)]  # an older row: no flag
    rows = {r["method"]: r for r in summarize(entries, "p")}
    assert rows["st++"]["wall_lower_bound"] and not rows["supervised"]["wall_lower_bound"]
    (tmp_path / "results").mkdir()
    save_entries(tmp_path / "results" / "p.json", entries)
    md = write_benchmarks_md(tmp_path / "results", tmp_path / "B.md").read_text()
    assert re.search(r"\| `st\+\+` \|.*\| ≥ 1\.0 min \|", md)
    assert re.search(r"\| `supervised` \|.*\| 1\.0 min \|", md)
