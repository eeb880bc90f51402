"""Where everything of a run directory lives: the one module that spells its folder and file names.

    <run>/stages/<i>-<name>/          one stage (:class:`StageLayout`)
        DONE                          written last: the stage finished (its record: key, seconds, memory)
        elapsed.json                  seconds computed so far over every session (a resumed stage counts them all)
        checkpoints/best.pt           the validated net at its best; best-<net>.pt for an extra validated net
        checkpoints/last.pt           every net and optimizer, for an exact resume
        checkpoints/snapshot-<s>.pt   a net at step s (ST++'s stability snapshots)
        metrics.jsonl, <extra>.json   the training log, files a stage writes (stability.json, ...)
        pseudo/                       a label stage's pseudo-label round (:mod:`semiseg.pseudo.store`, DONE too)

Engine, pipeline, api, report and methods ask these objects for a path; none spells one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STAGES = "stages"
CHECKPOINTS = "checkpoints"
DONE = "DONE"  # a finished stage's (and a finished pseudo-label round's) marker, written last
LAST = "last.pt"
ROUND = "pseudo"
METRICS = "metrics.jsonl"
# folders inside a stage that hold no pseudo-label round (a walk looking for rounds skips them)
NOT_ROUNDS = frozenset({CHECKPOINTS, "tensorboard", "labels", "confidence"})


def best_file(net: str | None = None) -> str:
    """The checkpoint a stage keeps of its best validated net: ``best.pt`` for the task's ``eval_net``,
    ``best-<net>.pt`` for an extra validated net (``TrainingTask.extra_eval_nets``)."""
    return "best.pt" if net is None else f"best-{net}.pt"


def is_done(path: Path) -> bool:
    """A stage or a pseudo-label round at ``path`` finished (its DONE marker exists)."""
    return (path / DONE).is_file()


@dataclass(frozen=True)
class StageLayout:
    """The files of one stage directory."""

    path: Path

    @property
    def index(self) -> int | None:
        head, _, _ = self.path.name.partition("-")
        return int(head) if head.isdigit() else None

    @property
    def name(self) -> str:
        """The stage's name (the folder without its ``<i>-`` prefix)."""
        head, _, rest = self.path.name.partition("-")
        return rest if head.isdigit() else self.path.name

    @property
    def done(self) -> Path:
        return self.path / DONE

    def is_done(self) -> bool:
        return is_done(self.path)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def elapsed(self) -> Path:
        """Seconds the stage has computed so far, over every session that worked on it."""
        return self.path / "elapsed.json"

    def best(self, net: str | None = None) -> Path:
        return self.checkpoints / best_file(net)

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    def snapshot(self, step: int) -> Path:
        return self.checkpoints / f"snapshot-{step}.pt"

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def training_set(self) -> Path:
        """What a training stage learned from (its init, its pseudo-label rounds and their stems)."""
        return self.path / "training_set.json"

    @property
    def round(self) -> Path:
        """A label stage's pseudo-label round."""
        return self.path / ROUND

    def file(self, name: str) -> Path:
        """A file the stage writes beside its checkpoints (``stability.json``, ``training_set.json``)."""
        return self.path / name


@dataclass(frozen=True)
class RunLayout:
    """The stage directories of one run."""

    run_dir: Path

    @property
    def stages_dir(self) -> Path:
        return self.run_dir / STAGES

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def results(self) -> Path:
        """What the finished run reports; written last (a run without it is not finished)."""
        return self.run_dir / "results.json"

    @property
    def diagnostics(self) -> Path:
        """Benchmark mode: the staged methods' per-round table (merged into the results)."""
        return self.run_dir / "diagnostics.json"

    def stage(self, index: int, name: str) -> StageLayout:
        return StageLayout(self.stages_dir / f"{index}-{name}")

    def stages(self) -> list[StageLayout]:
        """The stage directories on disk, in pipeline order."""
        if not self.stages_dir.is_dir():
            return []
        found = [StageLayout(p) for p in self.stages_dir.iterdir() if p.is_dir()]
        return sorted(found, key=lambda s: (s.index if s.index is not None else 1 << 30, s.name))

    def checkpoint_files(self) -> Iterator[Path]:
        """Every checkpoint any stage wrote."""
        for stage in self.stages():
            if stage.checkpoints.is_dir():
                yield from stage.checkpoints.glob("*.pt")

    def has_progress(self) -> bool:
        """True once any stage saved a checkpoint or finished: only then is a run worth resuming."""
        stages = self.stages()
        return (any(s.is_done() or is_done(s.round) for s in stages)
                or any(True for _ in self.checkpoint_files()))

    def last_checkpoint(self) -> Path | None:
        """The newest resume checkpoint of any stage."""
        found = [s.last for s in self.stages() if s.last.is_file()]
        return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None
