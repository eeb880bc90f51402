"""Per-class test IoU of a multi-class protocol's best method beside supervised and the method's own control:
which classes the unlabeled images help. Generated from the result files like every other table (issue 29)."""

from __future__ import annotations

import statistics
from typing import Any

from semiseg.bench.stats import BASELINES, algorithm_of


def _per_class(entries: list[dict], method: str, seeds: list[int]) -> dict[str, float] | None:
    """``method``'s per-class test IoU, averaged over ``seeds`` (None unless every seed has it)."""
    rows = {e["split_seed"]: (e.get("test_detail") or {}).get("per_class_iou") for e in entries
            if e["method"] == method}
    if any(not rows.get(s) for s in seeds):
        return None
    classes = list(rows[seeds[0]])
    return {c: statistics.fmean(rows[s][c] for s in seeds) for c in classes}


def best_method(summary: list[dict[str, Any]], entries: list[dict]) -> dict[str, Any] | None:
    """The method row with the highest mean test score among those on the most split seeds, baselines and
    supervised controls left out. A row on fewer seeds is not compared on its raw mean: one generous split seed
    lifts every method by more than they differ (camvid seed 0), so its mean is no rival to a three-seed one."""
    supervised_like = {e["method"] for e in entries if algorithm_of(e) == "supervised"} | set(BASELINES)
    candidates = [r for r in summary if r["method"] not in supervised_like and r["test_mean"] is not None]
    return max(candidates, key=lambda r: (len(r["seeds"]), r["test_mean"]), default=None)


def per_class_section(entries: list[dict], summary: list[dict[str, Any]], protocol: str) -> list[str]:
    """A markdown table of per-class test IoU (points) for ``protocol``'s best method, supervised and the method's
    own control, on the split seeds the best method has (all three columns averaged over the same seeds), with the
    best method's difference to its control (a binary protocol's two rows: background and foreground); empty where
    the rows hold no per-class IoU."""
    mine = [e for e in entries if e["protocol"] == protocol and e.get("test") is not None]
    best = best_method(summary, mine)
    if best is None:
        return []
    seeds = best["seeds"]
    wanted = dict.fromkeys(["supervised", best["control"], best["method"]])  # a control may be "none at N steps"
    columns = {n: c for n in wanted if n and (c := _per_class(mine, n, seeds)) is not None}
    if best["method"] not in columns:
        return []
    names = list(columns)
    control = best["control"] if best["control"] in columns and best["control"] != best["method"] else None
    head = "| class | " + " | ".join(f"`{n}`" for n in names) + (
        f" | `{best['method']}` − `{control}` |" if control else " |")
    lines = [f"Per-class test IoU (points; mean over split seed(s) {', '.join(map(str, seeds))}, the best "
             f"method's): which classes the unlabeled images help.", "", head,
             "|" + "---|" * (len(names) + 1 + bool(control))]
    for cls in columns[best["method"]]:
        cells = [f"{columns[n][cls] * 100:.1f}" for n in names]
        if control:
            cells.append(f"{(columns[best['method']][cls] - columns[control][cls]) * 100:+.1f}")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return [*lines, ""]
