"""Which method should I run on my data? (``semiseg pilot [CONFIG] --set data.source=mydata``)

Short pilots of a few candidate methods, each beside its compute-matched supervised control (supervised trained
for as many steps as the candidate's delivered network: ``trained_steps``), on one or more split seeds, scored on
**validation only**: every pilot run has ``eval.test=false``, so no test image is read. A pilot trains
``share`` x ``train.steps`` per training stage (default a quarter), so a pilot of a candidate costs about that
share of its full run. The ranking is by mean validation score, each candidate shown with its mean gain over its
control; a gain is called clear when it is positive on every seed and larger than twice its spread across seeds,
otherwise within noise (from one seed, which has no spread: "one seed"). The winner is the best-validated
candidate unless it does not beat its own control.

The candidates are the bench's strongest rows (BENCHMARKS.md, polyp), with the options their rows use. Pilots share
one out_dir, so a candidate built from other candidates' stages (ensemble-st) reads those stages back.
"""

from __future__ import annotations

import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semiseg.errors import ConfigError

CANDIDATES: dict[str, dict[str, Any]] = {
    "st++": {"retrain_scale": 2},
    "unimatch": {},
    "self-training": {"retrain_scale": 2},
    "mean-teacher": {},
    "atso": {"generations": 1, "generation_scale": 2},   # level with st++ on polyp, ahead of stso (issue 25)
    # after st++ and unimatch: its pilot reads their pilot stages back (same keys), so it adds a label stage and a
    # student only
    "ensemble-st": {"retrain_scale": 2},
}
DEFAULT_SHARE = 0.25


@dataclass
class PilotRow:
    method: str
    seed: int
    val: float
    control_val: float
    trained_steps: int
    seconds: float

    @property
    def gain(self) -> float:
        return self.val - self.control_val


@dataclass
class Ranked:
    method: str
    gain: float
    spread: float
    positive_seeds: int
    seeds: int
    val: float
    control_val: float
    full_minutes: float

    @property
    def trust(self) -> str:
        """``clear``, ``within noise``, or, from one seed (no spread to judge by), ``one seed``."""
        if self.seeds < 2:
            return "one seed"
        clear = self.positive_seeds == self.seeds and self.gain > 2 * self.spread
        return "clear" if clear else "within noise"


@dataclass
class PilotResult:
    ranking: list[Ranked]
    rows: list[PilotRow]
    command: str
    share: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ranking": [{**r.__dict__, "trust": r.trust} for r in self.ranking],
                "rows": [r.__dict__ for r in self.rows], "winner_command": self.command, "share": self.share,
                "seconds": self.seconds, "test_read": False}


def parse_methods(methods: str | None) -> list[tuple[str, dict[str, Any]]]:
    """``None``: the candidates; else ``a,b,...`` of registered methods (a candidate keeps its bench options)."""
    from semiseg.methods.registry import list_methods

    if methods is None:
        return [(m, dict(o)) for m, o in CANDIDATES.items()]
    names = [m.strip() for m in methods.split(",") if m.strip()]
    known = list_methods()
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise ConfigError(f"--methods {methods!r}: unknown method(s) {unknown or ['(none given)']}; known: "
                          f"{', '.join(sorted(known))}")
    if "supervised" in names:
        raise ConfigError("--methods: supervised is every candidate's control, not a candidate")
    return [(m, dict(CANDIDATES.get(m, {}))) for m in names]


def _val(results: dict[str, Any]) -> float:
    return float(results["val"][results["val_metric"]])


def run_pilot(config: str | None, overrides: Sequence[str], *, methods: str | None = None,
              seeds: Sequence[int] = (0, 1), share: float = DEFAULT_SHARE, out_dir: Path = Path("pilot-runs"),
              log: Callable[[str], None] = print) -> PilotResult:
    """Pilot every candidate and its control on ``seeds`` (resumable: finished pilot runs are read back)."""
    from semiseg import api

    if not 0 < share <= 1:
        raise ConfigError(f"--share {share}: a share of train.steps in (0, 1]")
    if not seeds:
        raise ConfigError("--seeds: give at least one split seed")
    candidates = parse_methods(methods)
    base = api.load_config(config, list(overrides))  # a bad config fails before anything trains
    steps = max(1, round(base.train.steps * share))
    common = [*overrides, f"train.steps={steps}", "eval.test=false", "train.progress=false", f"out_dir={out_dir}"]
    quiet = {"log": lambda *a, **k: None}
    rows: list[PilotRow] = []
    total, done, t0 = len(candidates) * len(seeds), 0, time.time()
    trained_seconds, trained = 0.0, 0  # the ETA's rate: pilots read back from out_dir cost nothing
    for seed in seeds:
        for method, options in candidates:
            cfg = api.load_config(config, [*common, f"split.seed={seed}", f"name=pilot-s{seed}-{method}",
                                           f"method.name={method}", *(f"method.{k}={v}" for k, v in options.items())])
            began = time.time()
            res, ran = api.finish(cfg, **quiet)
            steps_behind = int(res.get("trained_steps") or steps)
            ctrl_cfg = api.load_config(config, [*overrides, "eval.test=false", "train.progress=false",
                                                f"out_dir={out_dir}", f"train.steps={steps_behind}",
                                                f"split.seed={seed}", f"name=pilot-s{seed}-supervised-{steps_behind}",
                                                "method.name=supervised"])
            ctrl, ctrl_ran = api.finish(ctrl_cfg, **quiet)
            rows.append(PilotRow(method, seed, _val(res), _val(ctrl), steps_behind,
                                 float(res.get("stage_seconds", 0.0))))
            done += 1
            if ran or ctrl_ran:
                trained_seconds, trained = trained_seconds + time.time() - began, trained + 1
            eta = (f"ETA {trained_seconds / trained * (total - done) / 60:.1f} min" if trained
                   else "ETA after the first pilot that trains")
            log(f"pilot {done}/{total}: {method} split seed {seed}: validation {rows[-1].val:.3f} vs control "
                f"{rows[-1].control_val:.3f} ({rows[-1].gain:+.3f}){'' if ran or ctrl_ran else ' (read back)'}; "
                f"elapsed {(time.time() - t0) / 60:.1f} min, {eta}")
    ranking = rank(rows, share)
    winner = ranking[0]
    options = dict(candidates)[winner.method]
    command = " ".join(["semiseg", "train", *([shlex.quote(config)] if config else []),
                        *(f"--set {shlex.quote(api.portable_arg(o))}" for o in overrides),
                        f"--set method.name={winner.method}",
                        *(f"--set method.{k}={v}" for k, v in options.items())])
    return PilotResult(ranking, rows, command, share, time.time() - t0)


def rank(rows: Sequence[PilotRow], share: float) -> list[Ranked]:
    """Candidates by mean validation score (best first: the model a user wants), each with its mean gain over its
    own control (what the unlabeled images did). Not by the gain: controls differ in length, and a short control
    is a weak one, so ranking by gain favours the methods whose networks train fewest steps (on polyp split seed 1
    at a quarter of the budget, 250-step controls validated .605, 500-step ones .682). The full run's time is the
    pilot's stage time over ``share`` (steps scale linearly)."""
    out = []
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        gains = [r.gain for r in mine]
        out.append(Ranked(method, statistics.fmean(gains), statistics.pstdev(gains) if len(gains) > 1 else 0.0,
                          sum(g > 0 for g in gains), len(gains), statistics.fmean(r.val for r in mine),
                          statistics.fmean(r.control_val for r in mine),
                          statistics.fmean(r.seconds for r in mine) / share / 60))
    return sorted(out, key=lambda r: r.val, reverse=True)


def advised(ranking: Sequence[Ranked]) -> str:
    """The method the pilot advises: the best-validated candidate, or supervised when that one does not beat its
    own control (the unlabeled images did nothing for the user's best model)."""
    best = max(ranking, key=lambda r: r.val)
    return best.method if best.gain > 0 else "supervised"
