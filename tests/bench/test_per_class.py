"""The per-class IoU table of BENCHMARKS.md: the best method beside supervised and its own control, on the best
method's split seeds, from the result files only."""

from __future__ import annotations

import pytest

from semiseg.bench.per_class import per_class_section
from semiseg.bench.tables import summarize
from tests.test_bench_tables import entry


def row(method, seed, test, road, car, steps, **kw):
    return entry(method, seed, test, trained_steps=steps,
                 test_detail={"per_class_iou": {"Road": road, "Car": car}}, **kw)


def test_per_class_table_by_hand():
    entries = [
        row("supervised", 0, 0.40, 0.80, 0.40, 10), row("supervised", 1, 0.42, 0.82, 0.44, 10),
        row("supervised", 2, 0.44, 0.90, 0.50, 10),  # a seed the best method lacks: left out of every column
        row("supervised-2x", 0, 0.41, 0.81, 0.41, 20, algorithm="supervised"),
        row("supervised-2x", 1, 0.43, 0.83, 0.45, 20, algorithm="supervised"),
        row("oracle", 0, 0.60, 0.95, 0.70, 40), row("oracle", 1, 0.60, 0.95, 0.70, 40),
        row("st", 0, 0.45, 0.85, 0.50, 20), row("st", 1, 0.47, 0.89, 0.52, 20),
        row("weak", 0, 0.30, 0.70, 0.10, 10),
    ]
    lines = per_class_section(entries, summarize(entries, "p"), "p")
    assert "split seed(s) 0, 1" in lines[0]
    assert lines[2] == "| class | `supervised` | `supervised-2x` | `st` | `st` − `supervised-2x` |"
    # Road: supervised (80 + 82) / 2, control (81 + 83) / 2, st (85 + 89) / 2, st - control = 87 - 82
    assert lines[4] == "| Road | 81.0 | 82.0 | 87.0 | +5.0 |"
    assert lines[5] == "| Car | 42.0 | 43.0 | 51.0 | +8.0 |"


def test_the_best_method_is_judged_on_the_most_split_seeds():
    """A one-seed row with the highest mean is not the best method while a row on more seeds exists."""
    entries = [
        row("supervised", 0, 0.40, 0.80, 0.40, 10), row("supervised", 1, 0.42, 0.82, 0.44, 10),
        row("st", 0, 0.45, 0.85, 0.50, 20), row("st", 1, 0.43, 0.89, 0.52, 20),
        row("lucky", 0, 0.50, 0.99, 0.60, 20),
    ]
    lines = per_class_section(entries, summarize(entries, "p"), "p")
    assert "split seed(s) 0, 1" in lines[0] and "`st` |" in lines[2] and "lucky" not in lines[2]
    entries.append(row("lucky", 1, 0.44, 0.90, 0.50, 20))  # on as many seeds now, and higher on the mean
    assert "`lucky` |" in per_class_section(entries, summarize(entries, "p"), "p")[2]


def test_no_table_without_per_class_scores_and_no_control_column_without_a_control():
    plain = [entry("supervised", 0, 0.4), entry("st", 0, 0.5, trained_steps=20)]
    assert per_class_section(plain, summarize(plain, "p"), "p") == []
    entries = [row("supervised", 0, 0.40, 0.80, 0.40, 10), row("st", 0, 0.45, 0.85, 0.50, 20)]
    lines = per_class_section(entries, summarize(entries, "p"), "p")  # st's control: "none at 20 steps"
    assert lines[2] == "| class | `supervised` | `st` |" and lines[4] == "| Road | 80.0 | 85.0 |"


@pytest.mark.parametrize("only", [["supervised", "oracle"], []])
def test_no_table_without_a_method(only):
    entries = [row(m, 0, 0.4, 0.8, 0.4, 10) for m in only]
    assert per_class_section(entries, summarize(entries, "p"), "p") == []
