"""What every benchmark table shares: the validity gate, the baseline rows, a row's method, and mean ± std over split
seeds."""

from __future__ import annotations

import math
import statistics

# BENCHMARK.md's validity gate: a split seed whose oracle beats its supervised run by less than this (3 points)
# says nothing about unlabeled data; it is marked and left out of "gap recovered".
VALIDITY_GATE = 0.03
BASELINES = ("supervised", "oracle")


def algorithm_of(e: dict) -> str:
    """The method a bench row ran (``supervised-2x`` runs ``supervised``)."""
    return e.get("algorithm") or e["method"]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
