"""Side measurements beside the protocols' method matrices (issue 30), kept in the same results folder.

Their scripts write ``<protocol>-<kind>.json`` (rows, each with its command and commit) and the table they make of
them as ``.md``; BENCHMARKS.md shows that table and the commands, never numbers of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

KINDS = {
    "al": ("Which images to label next", "`suggest-labels`' picks (`uncertain`: least confident, stratified by "
           "source dataset; `typical`: TypiClust) against three random draws and the most confident end, each added "
           "to the labeled split and retrained (`benchmarks/active_learning.py`); test Dice."),
    "pilot": ("Does `semiseg pilot` pick the bench's best method?", "per split seed, the pilot's pick (validation "
              "only) against the best bench row of that seed on test (`benchmarks/pilot_vs_bench.py`)."),
    "videos": ("Test score per video", "the delivered models of bench rows re-evaluated on their test split one "
               "source video at a time (`benchmarks/per_sequence.py`), for a diagnosis only: nothing is chosen "
               "from it; the videos' confusion matrices pool back to each row's recorded score."),
}


def measurement_kind(path: Path) -> str | None:
    """``al`` for ``polyp-al.json`` (a kind of :data:`KINDS`), None for a protocol's results file."""
    kind = path.stem.rsplit("-", 1)[-1]
    return kind if "-" in path.stem and kind in KINDS else None


def measurements_section(results_dir: Path) -> list[str]:
    """Markdown lines: each measurement's table (its ``.md``) and the commands and commits of its rows."""
    parts: list[str] = []
    for path in sorted(results_dir.glob("*.json")):
        kind = measurement_kind(path)
        table = path.with_suffix(".md")
        if kind is None or not table.is_file():
            continue
        title, what = KINDS[kind]
        rows = json.loads(path.read_text()).get("rows", [])
        runs = sorted({(r.get("command") or "", r.get("commit") or "?") for r in rows})
        parts += [f"## {title}: `{path.stem.rsplit('-', 1)[0]}`", "", f"What: {what}", "", table.read_text().strip(),
                  "", "Commands:", "", *[f"- `{command}` (commit {commit})" for command, commit in runs], ""]
    return parts
