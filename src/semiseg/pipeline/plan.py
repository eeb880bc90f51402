"""A method's stages, planned before anything runs: each stage is a handle, its reuse key is derived here.

A method declares its stages on a :class:`Pipeline` (``train``, ``label``, ``add``) and gets back a
:class:`StageRef` for each: where the stage lives, which checkpoint or model it selected, its pseudo-label
round. No method spells a directory or a checkpoint name. What decides that a finished stage may be reused
(its content key, :func:`stage_key`) is assembled in one place from what the stage reads: the run's data,
split, model and training sections, its input stages, the method options it declares (``options=``: the
only ones its task is handed, and the only ones it can read while it runs, :mod:`semiseg.options`) and the
plan-time constants the pipeline gives it (``variant``: a label stage's policy and TTA, the oracle's split).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from semiseg.atomic import atomic_write_text
from semiseg.engine.checkpoint import load_checkpoint, seed_everything
from semiseg.engine.task import TrainingTask
from semiseg.layout import RunLayout, StageLayout
from semiseg.losses import cross_entropy, labeled_loss
from semiseg.models.ensemble import MeanProbabilities
from semiseg.models.factory import build_model
from semiseg.options import Declared, MethodOptions, declared_names, key_of, option_slice, reading_only
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.labeling import label_work, labeling_params, load_round
from semiseg.pipeline.stages import Stage, key_hash
from semiseg.pipeline.training import fit
from semiseg.pseudo.store import PseudoRound

Which = Literal["best", "last"]

# train-section fields that change nothing a stage computes (``steps``: every training stage keys its own)
NOT_READ = {"progress", "num_workers", "tensorboard", "checkpoint_every", "steps"}


@dataclass(frozen=True, eq=False)
class StageRef:
    """A handle on one planned stage and, once it has run, on its outputs."""

    run: RunContext
    name: str
    index: int
    key_hash: str | None
    steps: int | None = None  # a training stage's optimizer steps
    init: Source | None = None  # the stage whose weights a training stage starts from (None: the shared init)
    options: tuple[str, ...] = ()  # the method options the stage declared it reads (all of them: in its key)

    @property
    def layout(self) -> StageLayout:
        """The stage directory's files."""
        return RunLayout(self.run.run_dir).stage(self.index, self.name)

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def refs(self) -> list[StageRef]:
        return [self]

    def resolve(self) -> StageRef:
        return self

    def checkpoint(self, net: str | None = None, which: Which = "best") -> Path:
        """The checkpoint that holds ``net`` as selected on validation (the trainer's best file; ``net`` an
        extra validated net has its own), else the stage's last checkpoint."""
        layout = self.layout
        if which == "best":
            for path in ([layout.best(net)] if net else []) + [layout.best()]:
                if path.exists():
                    return path
        return layout.last

    def best_metric(self) -> float | None:
        """The best validation score the stage reached (None when nothing was validated)."""
        path = self.layout.best()
        return float(load_checkpoint(path)["metric"]) if path.exists() else None

    def model(self, net: str | None = None, which: Which = "best") -> nn.Module:
        """``net`` (default: the validated net) as the stage selected it, weights loaded, in eval mode."""
        run = self.run
        model = build_model(run.config.model, run.classes.num_classes)
        path = self.checkpoint(net, which)
        state = load_checkpoint(path)
        if path == self.layout.last:
            nets = state["nets"]
            model.load_state_dict(nets[net or next(iter(nets))])
        else:
            model.load_state_dict(state["net"])
        return model.to(run.device).eval()

    def read_json(self, name: str) -> Any:
        """A JSON file the stage wrote (e.g. ST++'s ``stability.json``)."""
        return json.loads((self.path / name).read_text())

    def round(self) -> PseudoRound:
        """The pseudo-label round a label stage wrote."""
        return load_round(self.path)


class BestOf:
    """The stage among ``refs`` whose best validation score is highest (the first on ties, as a checkpoint
    replaced only on strict improvement; the last when none was validated), decided when it is read."""

    def __init__(self, refs: Sequence[StageRef]) -> None:
        self.refs = list(refs)

    def resolve(self) -> StageRef:
        best, best_metric = None, None
        for ref in self.refs:
            metric = ref.best_metric()
            if metric is not None and (best_metric is None or metric > best_metric):
                best, best_metric = ref, metric
        return best if best is not None else self.refs[-1]


Source = StageRef | BestOf
"""Where a model comes from: one stage, or the best of several (resolved once they have run)."""


@dataclass(frozen=True)
class StageInputs:
    """What a training stage's task is handed: the options it declared (``options``: a slice, or the method's
    options object when it declared ``ALL``), its total optimizer steps, its input stages, and the loss of its
    labeled term (the run's ``train.loss``, in every stage key through the training section)."""

    name: str
    options: Any  # OptionSlice | MethodOptions: typed as the method declares each option
    steps: int
    inputs: tuple[Source, ...] = ()
    init: Source | None = None
    labeled_loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy  # the run's train.loss


def stage_key(run: RunContext, name: str, *, inputs: Sequence[Source] = (), options: dict[str, Any] | None = None,
              variant: dict[str, Any] | None = None, steps: int | None = None) -> dict[str, Any] | None:
    """The content key of a stage: everything of the run it may read (data, split, model, training section,
    selection metric, seeds, number of processes: the global batch), the keys of its input stages, the method
    ``options`` it declared and its plan-time ``variant``. None when an input is never reused (its outputs
    cannot be named by content)."""
    hashes = [ref.key_hash for source in inputs for ref in source.refs]
    if any(h is None for h in hashes):
        return None
    cfg, splits = run.config, run.splits
    return {"stage": name, "seed": cfg.seed, "init_seed": run.init_seed, "world_size": run.dist.world_size,
            "split": {"labeled": splits.labeled, "unlabeled": splits.unlabeled, "val": splits.val},
            "data": cfg.data.model_dump(mode="json", exclude={"benchmark_gt"}),
            "model": cfg.model.model_dump(mode="json"),
            "train": cfg.train.model_dump(mode="json", exclude=NOT_READ), "val_metric": run.val_metric,
            "steps": steps, "inputs": hashes, "options": options, "variant": variant}


@dataclass(frozen=True)
class NetOf:
    """One named net of a stage's model as a teacher (a method's delivered net, e.g. mean-teacher's EMA teacher)."""

    source: Source
    net: str

    @property
    def refs(self) -> list[StageRef]:
        return self.source.refs


Teacher = Source | NetOf
"""What labels: a stage's validated model, or one named net of it."""


@dataclass
class Pipeline:
    """The stages of one method, in order, each with its handle.

    A pipeline made by :meth:`nested` holds another method's stages inside this run (a teacher of this method):
    they join this run's stage list named ``prefix + name`` and are keyed exactly as that method's own run keys
    them (its stage names, its options), so a run of it under the same ``out_dir`` shares them."""

    run: RunContext
    stages: list[Stage] = field(default_factory=list)
    refs: dict[str, StageRef] = field(default_factory=dict)
    trainings: list[StageRef] = field(default_factory=list)
    prefix: str = ""
    method_options: MethodOptions | None = None  # a nested pipeline's method's options (else the run's)
    parent: Pipeline | None = None

    def __getitem__(self, name: str) -> StageRef:
        return self.refs[name]

    @property
    def options(self) -> MethodOptions:
        """The options of the method planning here (the run config holds the run's method's)."""
        return self.method_options if self.method_options is not None else self.run.config.method

    def nested(self, prefix: str, options: MethodOptions) -> Pipeline:
        """A pipeline for another method's stages inside this run, named ``prefix + name``, keyed by ``options``."""
        return Pipeline(self.run, stages=self.stages, prefix=self.prefix + prefix, method_options=options,
                        parent=self)

    def _adopt(self, qualified: str, ref: StageRef) -> None:
        """A nested pipeline's stage, listed here (and above) under its qualified name."""
        if qualified in self.refs:
            raise ValueError(f"stage name {qualified!r} used twice")
        self.refs[qualified] = ref
        if self.parent is not None:
            self.parent._adopt(qualified, ref)

    def add(self, name: str, work: Callable[[Path], None], *, options: Declared = (), inputs: Sequence[Source] = (),
            variant: dict[str, Any] | None = None, reuse: bool = True, steps: int | None = None,
            init: Source | None = None) -> StageRef:
        """A stage doing ``work(stage_dir)`` (it resumes from whatever it left there). ``options``: the method
        options ``work`` reads (the only ones it can read while it runs); ``variant``: the plan-time values it
        was built with; ``reuse=False``: never taken from another run (e.g. a report of this run's stages)."""
        if name in self.refs:
            raise ValueError(f"stage name {name!r} used twice")
        qualified = self.prefix + name  # its directory; the key holds the name its method gives it
        names = declared_names(self.options, options, name)
        key = None
        if reuse:
            key = stage_key(self.run, name, inputs=inputs, options=key_of(self.options, names, name),
                            variant=variant, steps=steps)
        ref = StageRef(self.run, qualified, len(self.stages), key_hash(key), steps=steps, init=init, options=names)
        if self.parent is not None:
            self.parent._adopt(qualified, ref)

        def sealed(path: Path) -> None:
            with reading_only(qualified, names):
                work(path)

        self.stages.append(Stage(qualified, sealed, key=key))
        self.refs[name] = ref
        return ref

    def train(self, name: str, task: Callable[[StageInputs], TrainingTask], *, options: Declared = (),
              steps: int | None = None, init: Source | None = None, inputs: Sequence[Source] = (),
              variant: dict[str, Any] | None = None, record: Callable[[], dict[str, Any]] | None = None) -> StageRef:
        """A training stage: ``task(StageInputs)`` fitted for ``steps`` (default ``train.steps``) with validation
        and resumable checkpoints. ``options``: the method options the task reads (names, or ``ALL``); it is
        handed only those. ``init``: the stage whose selected weights ``task`` starts from (an input; it also
        counts towards :meth:`steps_behind`). ``record()`` is written to ``training_set.json``."""
        run = self.run
        steps = steps or run.config.train.steps
        sources = [*inputs, *([init] if init is not None else [])]
        handed = StageInputs(name, option_slice(self.options, options, name), steps, tuple(inputs), init,
                             labeled_loss=labeled_loss(run.config.train.loss))

        def work(path: Path) -> None:
            seed_everything(run.stage_seed(name))  # a fresh start does not depend on what ran before
            if record is not None and run.dist.is_main:
                atomic_write_text(StageLayout(path).training_set, json.dumps(record(), indent=1))
            fit(run, task(handed), path, steps=steps)

        ref = self.add(name, work, options=options, inputs=sources, variant=variant, steps=steps, init=init)
        self.trainings.append(ref)
        return ref

    def label(self, name: str, *, teacher: Teacher | Sequence[Teacher],
              stems: Sequence[str] | Callable[[], Sequence[str]], policy: Any, which: Which = "best",
              tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False, previous: Sequence[StageRef] = (),
              batch_size: int | None = None, inputs: Sequence[Source] = ()) -> StageRef:
        """A stage writing one pseudo-label round of ``stems`` with ``teacher``'s model through ``policy``
        (see :mod:`semiseg.pipeline.labeling`); several teachers label as one, their softmax probabilities
        averaged (:class:`~semiseg.models.ensemble.MeanProbabilities`). ``stems`` may be a callable of upstream
        outputs; their stage goes in ``inputs``. ``previous``: earlier rounds, for the flip rate. It reads no
        method option: what the labels depend on is in these arguments, and so in its key."""
        teachers = list(teacher) if isinstance(teacher, list | tuple) else [teacher]
        nets = [t.net if isinstance(t, NetOf) else None for t in teachers]
        stages = [t.source if isinstance(t, NetOf) else t for t in teachers]

        def model() -> nn.Module:
            members = [s.resolve().model(net=n, which=which) for s, n in zip(stages, nets, strict=True)]
            return members[0] if len(members) == 1 else MeanProbabilities(members).eval()

        def checkpoint() -> Path | None:  # an ensemble's provenance is its members' weights hash alone
            return stages[0].resolve().checkpoint(nets[0], which=which) if len(teachers) == 1 else None

        work = label_work(self.run, model=model, stems=stems, policy=policy, tta_scales=tta_scales,
                          tta_flip=tta_flip, batch_size=batch_size, previous=lambda: [p.path for p in previous] or None,
                          checkpoint=checkpoint)
        variant = {**labeling_params(self.run, policy, tta_scales, tta_flip), "batch_size": batch_size,
                   "which": which, "stems": None if callable(stems) else list(stems)}
        if any(nets):  # only then: the keys of label stages from validated nets stay as they were
            variant["nets"] = nets
        return self.add(name, work, inputs=[*stages, *inputs, *previous], variant=variant)

    def last_training(self) -> StageRef:
        if not self.trainings:
            raise ValueError("the pipeline has no training stage")
        return self.trainings[-1]

    def steps_behind(self, source: Source) -> int:
        """Optimizer steps behind ``source``'s model, from the shared initialisation: its own steps plus those
        of the stage it started from, and so on (read after the stages ran when a :class:`BestOf` decides)."""
        ref = source.resolve()
        own = ref.steps or 0
        return own + (self.steps_behind(ref.init) if ref.init is not None else 0)
