"""Benchmark result arithmetic: merging partial runs, gap recovered, mean ± std, the markdown table."""

import math

import pytest

from semiseg.bench.tables import gap_recovered, load_entries, merge, save_entries, summarize, write_benchmarks_md


def entry(method, seed, test, **kw):
    return {"protocol": "p", "method": method, "split_seed": seed, "seed": 0, "test": test,
            "headline_metric": "dice", "wall_seconds": 60.0, "peak_rss_mb": 100.0, "commit": "abc",
            "command": f"semiseg bench p --methods {method}", **kw}


def test_gap_recovered_hand_values():
    assert gap_recovered(0.75, 0.70, 0.80) == pytest.approx(0.5)
    assert gap_recovered(0.65, 0.70, 0.80) == pytest.approx(-0.5)
    assert gap_recovered(0.75, 0.70, 0.70) is None  # no gap to recover
    assert gap_recovered(0.75, 0.80, 0.70) is None


def test_merge_combines_sessions_and_newer_wins(tmp_path):
    path = tmp_path / "p.json"
    save_entries(path, merge([], [entry("supervised", 0, 0.70), entry("oracle", 0, 0.80)]))
    # a later session adds seed 1 and re-runs supervised seed 0
    save_entries(path, merge(load_entries(path), [entry("supervised", 1, 0.60), entry("supervised", 0, 0.71)]))
    entries = load_entries(path)
    assert len(entries) == 3
    assert {(e["method"], e["split_seed"]): e["test"] for e in entries}[("supervised", 0)] == 0.71


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
