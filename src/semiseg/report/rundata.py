"""Read what a run directory holds (results, config, splits, stages, metrics, pseudo-label rounds).

Only files are read here, no model: the numbers a report shows come from these files, so they equal
what the run wrote. Label stages keep their :class:`~semiseg.pseudo.store.PseudoLabelStore` rounds
somewhere inside the stage directory; rounds are found by their files (``DONE`` + ``stats.json`` +
``stems.txt``), so the report does not depend on where a method put its store.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semiseg.errors import ConfigError, DataError
from semiseg.layout import NOT_ROUNDS, RunLayout, is_done
from semiseg.pseudo.store import PseudoRound

SPLIT_NAMES = ("labeled", "unlabeled", "val", "test")


@dataclass
class StageInfo:
    """One stage directory: its metrics log, DONE record and pseudo-label rounds."""

    path: Path
    index: int
    name: str
    metrics: list[dict[str, Any]] = field(default_factory=list)
    done: dict[str, Any] | None = None
    rounds: list[PseudoRound] = field(default_factory=list)


@dataclass
class RunInfo:
    """Everything a report reads from a finished run's directory."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any]
    splits: dict[str, list[str]]
    stages: list[StageInfo]

    @property
    def method(self) -> str:
        return str(self.results.get("method") or (self.config.get("method") or {}).get("name") or "?")

    @property
    def name(self) -> str:
        return str(self.results.get("name") or self.path.name)

    @property
    def headline_metric(self) -> str:
        test = self.results.get("test") or {}
        return str(test.get("headline_metric") or self.results.get("val_metric") or "miou")

    @property
    def headline(self) -> float | None:
        value = (self.results.get("test") or {}).get("headline")
        return float(value) if isinstance(value, (int, float)) else None


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON ({e})") from e


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (an unparsable last line, e.g. a kill mid-write, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def find_rounds(stage_dir: Path, max_depth: int = 3) -> list[PseudoRound]:
    """Finished pseudo-label rounds anywhere under ``stage_dir`` (sorted by path)."""
    found: list[PseudoRound] = []
    base_depth = len(stage_dir.parts)
    for root, dirs, files in os.walk(stage_dir):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if d not in NOT_ROUNDS and not d.startswith("."))
        if len(here.parts) - base_depth >= max_depth:
            dirs[:] = []
        if here != stage_dir and is_done(here) and {"stats.json", "stems.txt"} <= set(files):
            try:
                found.append(PseudoRound(here))
            except DataError:
                continue
            dirs[:] = []
    return sorted(found, key=lambda r: str(r.path))


def read_stages(run_dir: Path) -> list[StageInfo]:
    """Stage directories in pipeline order."""
    out = []
    for stage in RunLayout(run_dir).stages():
        done = read_json(stage.done) if stage.is_done() else None
        index = stage.index if stage.index is not None else 1 << 30
        out.append(StageInfo(stage.path, index, stage.name, read_metrics(stage.metrics),
                             done if isinstance(done, dict) else None, find_rounds(stage.path)))
    return out


def read_splits(run_dir: Path) -> dict[str, list[str]]:
    out = {}
    for name in SPLIT_NAMES:
        f = run_dir / "splits" / f"{name}.txt"
        out[name] = [s for s in f.read_text(encoding="utf-8").splitlines() if s] if f.is_file() else []
    return out


def read_run(run_dir: Path) -> RunInfo:
    """Read a finished run; a directory without ``results.json`` is a :class:`ConfigError`."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise ConfigError(f"{run_dir}: no finished run here (no results.json); train or resume it first")
    results = read_json(run_dir / "results.json")
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{run_dir / 'config.yaml'}: cannot read the run's config ({e})") from e
    return RunInfo(run_dir, results, config, read_splits(run_dir), read_stages(run_dir))
