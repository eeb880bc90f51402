"""semiseg pilot: candidates ranked by validation, each with its gain over its compute-matched control, never a test
image, the winner's command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from semiseg.bench.pilot import PilotRow, advised, rank
from tests.bench.scripts import load_script
from tests.safety_helpers import TINY, cli


def test_ranking_by_hand():
    rows = [PilotRow("a", 0, 0.70, 0.60, 10, 60.0), PilotRow("a", 1, 0.66, 0.60, 10, 60.0),
            PilotRow("b", 0, 0.61, 0.60, 10, 30.0), PilotRow("b", 1, 0.58, 0.60, 10, 30.0)]
    first, second = rank(rows, share=0.25)
    assert (first.method, second.method) == ("a", "b")
    assert first.gain == pytest.approx(0.08) and first.spread == pytest.approx(0.02)
    assert first.trust == "clear" and first.positive_seeds == 2 and first.full_minutes == pytest.approx(4.0)
    assert second.gain == pytest.approx(-0.005) and second.trust == "within noise" and second.positive_seeds == 1
    # the best-validated first, not the largest gain: a long control is a strong one
    c, d = PilotRow("c", 0, 0.72, 0.70, 20, 60.0), PilotRow("d", 0, 0.69, 0.60, 10, 30.0)
    assert [r.method for r in rank([d, c], share=0.25)] == ["c", "d"]
    assert advised(rank([d, c], share=0.25)) == "c"
    # the best-validated candidate below its own control: the advice is supervised, not the runner-up
    assert advised(rank(rows, share=0.25)) == "a" and advised([second, rank([d], share=0.25)[0]]) == "d"
    assert advised([second]) == "supervised"
    # one seed has no spread: its gain is never called clear, however large
    alone = rank([PilotRow("a", 0, 0.70, 0.60, 10, 60.0)], share=0.25)[0]
    assert alone.spread == 0 and alone.trust == "one seed"


def test_pilot_ranks_candidates_on_validation_only_and_prints_the_winners_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEMISEG_CACHE", str(tmp_path / "cache"))
    sets = [x for s in [*TINY, "data.options.n=30"] for x in ("--set", s)]
    res = cli(["pilot", *sets, "--methods", "mean-teacher,fixmatch", "--seeds", "0,1", "--share", "0.5",
               "--out-dir", tmp_path / "pilot", "--json", tmp_path / "pilot.json"], capsys)
    assert res.code == 0, res.err
    doc = json.loads((tmp_path / "pilot.json").read_text())
    assert [r["method"] for r in doc["ranking"]] == sorted(["mean-teacher", "fixmatch"],
                                                             key=lambda m: -next(r["val"] for r in doc["ranking"]
                                                                                if r["method"] == m))
    assert len(doc["rows"]) == 4 and doc["test_read"] is False
    assert "pilot 4/4" in res.err and "ETA" in res.err  # progress with an ETA
    assert "train " in res.out and ("--set method.name=" in res.out or "train supervised" in res.out)
    results = [json.loads(p.read_text()) for p in (tmp_path / "pilot").glob("*/results.json")]
    assert len(results) >= 4 and all(r["test"] is None for r in results)  # candidates and controls: no test read
    steps = {r["name"]: r["trained_steps"] for r in results}
    assert steps["pilot-s0-mean-teacher"] == 3  # half of TINY's 6 steps
    # again on the same out-dir: every pilot is read back, and no ETA of 0 is promised from them
    again = cli(["pilot", *sets, "--methods", "mean-teacher,fixmatch", "--seeds", "0,1", "--share", "0.5",
                 "--out-dir", tmp_path / "pilot"], capsys)
    assert again.code == 0 and again.err.count("(read back)") == 4
    assert "ETA after the first pilot that trains" in again.err and "ETA 0.0" not in again.err


@pytest.mark.parametrize("args,message", [
    (["--methods", "magic"], "unknown method(s) ['magic']"),
    (["--methods", "supervised"], "supervised is every candidate's control"),
    (["--share", "0"], "--share 0.0"),
    (["--seeds", "a"], "--seeds 'a'"),
])
def test_bad_pilot_requests_are_one_line_errors(capsys, args, message):
    res = cli(["pilot", *args], capsys)
    assert res.code != 0 and message in res.err and "Traceback" not in res.err


def test_pilot_vs_bench_compares_the_pick_with_the_bench_best_of_that_seed(tmp_path):
    script = load_script("pilot_vs_bench")
    entries = [{"method": m, "split_seed": s, "test": t} for m, s, t in [
        ("supervised", 0, 0.70), ("st++", 0, 0.79), ("unimatch", 0, 0.785), ("oracle", 0, 0.85),
        ("supervised", 1, 0.71), ("st++", 1, 0.74), ("unimatch", 1, 0.78)]]
    (tmp_path / "p.json").write_text(json.dumps({"entries": entries}))
    close = script.compare("p", 0, "unimatch", ["st++", "unimatch"], tmp_path)
    # the oracle is no candidate: the best is st++, half a point ahead of the pick
    assert close["bench_best"] == "st++" and close["behind_best"] == pytest.approx(0.005)
    far = script.compare("p", 1, "st++", ["st++", "unimatch", "mean-teacher"], tmp_path)
    assert far["behind_best"] == pytest.approx(0.04) and far["bench_rows_missing"] == ["mean-teacher"]
    assert "Within 1 point of the bench's best: 1 of 2 seeds" in script.table([close, far])


def test_pilot_vs_bench_saves_each_seed_and_skips_seeds_already_measured(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import semiseg.bench.pilot as pilot

    script = load_script("pilot_vs_bench")
    entries = [{"method": m, "split_seed": s, "test": t} for m, s, t in [
        ("supervised", 0, 0.70), ("st++", 0, 0.79), ("unimatch", 0, 0.785),
        ("supervised", 1, 0.71), ("st++", 1, 0.74), ("unimatch", 1, 0.78)]]
    (tmp_path / "p.json").write_text(json.dumps({"entries": entries}))
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    piloted: list[int] = []

    def fake_pilot(protocol, overrides, *, seeds, **_):
        piloted.extend(seeds)
        return SimpleNamespace(ranking=[pilot.PilotRow("unimatch", seeds[0], 0.7, 0.6, 10, 1.0)], seconds=1.0)

    monkeypatch.setattr(pilot, "run_pilot", fake_pilot)
    argv = ["--protocol", "p", "--methods", "st++,unimatch", "--seeds", "0"]
    assert script.main(argv) == 0 and piloted == [0]
    assert script.main([*argv[:-1], "0,1"]) == 0 and piloted == [0, 1]  # seed 0 read back, seed 1 piloted
    rows = json.loads((tmp_path / "p-pilot.json").read_text())["rows"]
    assert [(r["split_seed"], r["pick"]) for r in rows] == [(0, "unimatch"), (1, "unimatch")]
    assert all("pilot_vs_bench.py" in r["command"] for r in rows)
    with pytest.raises(SystemExit, match="p-pilot.json: holds share 0.25"):
        script.main([*argv, "--share", "0.5"])
    # a seed piloted when the ranking was by gain is re-picked by validation from its stored ranking, not re-run
    doc = json.loads((tmp_path / "p-pilot.json").read_text())
    doc["rows"][0].pop("rank_by")
    doc["rows"][0]["ranking"] = [{"method": "unimatch", "val": 0.70, "gain": 0.10},
                                 {"method": "st++", "val": 0.72, "gain": 0.02}]
    (tmp_path / "p-pilot.json").write_text(json.dumps(doc))
    assert script.main([*argv[:-1], "0,1"]) == 0 and piloted == [0, 1]
    row = json.loads((tmp_path / "p-pilot.json").read_text())["rows"][0]
    assert (row["pick"], row["pick_by_gain"], row["rank_by"], row["pick_test"]) == ("st++", "unimatch", "val", 0.79)
    # a bench row that lands after its seed's pilot is compared on the next run (nothing re-piloted)
    assert row_of(tmp_path, 1)["bench_best"] == "unimatch" and row_of(tmp_path, 1)["bench_rows_missing"] == []
    entries.append({"method": "ensemble-st", "split_seed": 1, "test": 0.82})
    (tmp_path / "p.json").write_text(json.dumps({"entries": entries}))
    three = ["--protocol", "p", "--methods", "st++,unimatch,ensemble-st", "--results", tmp_path / "p3.json"]
    assert script.main([*map(str, three), "--seeds", "1"]) == 0 and piloted == [0, 1, 1]
    entries[-1]["test"] = 0.83
    (tmp_path / "p.json").write_text(json.dumps({"entries": entries}))
    assert script.main([*map(str, three), "--seeds", "1"]) == 0 and piloted == [0, 1, 1]
    row = json.loads((tmp_path / "p3.json").read_text())["rows"][0]
    assert (row["bench_best"], row["bench_best_test"]) == ("ensemble-st", 0.83)


def row_of(results: Path, seed: int) -> dict:
    return next(r for r in json.loads((results / "p-pilot.json").read_text())["rows"] if r["split_seed"] == seed)
