"""Self-learning, STSO and ATSO (Huo et al., "ATSO: Asynchronous Teacher-Student Optimization").

**No public code exists for ATSO** (official-code-notes §2): every schedule detail and default here is
read from the paper (arXiv 2006.13461) and is *paper-derived, unverified*. M0 is the shared supervised
teacher; one generation = label with the teachers, then train the students (cross-entropy on labeled +
pseudo-labeled images, one shuffled loader, pseudo labels = hard argmax, no threshold):

- ``self-learning``: generation t labels all of R with M_{t-1}; the student M_t STARTS FROM M_{t-1}
  (continual fine-tuning) and trains on S ∪ R_t. Delivers M_T.
- ``stso``: the same, but every student starts from scratch (a fresh initialisation).
- ``atso``: R is split ONCE into two fixed halves A and B (seeded from the run seed: :func:`atso_halves`).
  Generation t labels A with M^B_{t-1} and B with M^A_{t-1} (M^A_0 = M^B_0 = M0), then trains M^A_t on
  S ∪ A_t and M^B_t on S ∪ B_t, both from scratch (Algorithm 1). A model never labels the half it was
  trained on. Finally both halves get their latest labels (``final_relabel``) and the delivered model
  trains from scratch on S ∪ A ∪ B.

In benchmark mode a last stage writes the lazy-learning table (``run_dir/diagnostics.json``): per
generation, the pseudo labels' quality on the reference (unlabeled) set, each model's accuracy on the
reference set (for ATSO on both halves: the paper's Table 4) and on test. Test is never used to
select anything; the figures sit under the ``diagnostics`` key only.

The small helpers at the top (:class:`StagePlan`, :func:`method_key`, :func:`scores_on_test`, ...) are
shared with ``semiseg.methods.dst_cbc``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from torch import nn

from semiseg.data.classes import IGNORE_INDEX
from semiseg.engine.checkpoint import atomic_write_text, load_checkpoint, seed_everything
from semiseg.engine.loader import EndlessLoader
from semiseg.errors import ConfigError
from semiseg.evaluation.evaluator import evaluate_arrays, evaluate_source, foreground_index
from semiseg.evaluation.metrics import ConfusionMatrix, ForegroundScores
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.supervised import SupervisedTask, supervised_stage
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.labeling import PseudoLabeledDataset, label_stage, load_round, pseudo_dataset
from semiseg.pipeline.stages import Stage, stage_dir
from semiseg.pipeline.training import fit, load_stage_model, make_dataset, make_loader, new_model
from semiseg.pseudo.policies import SelectAll

UNVERIFIED = "paper-derived, unverified (no public ATSO code exists)"


# ------------------------------------------------------------------------------- shared helpers
class StagePlan:
    """A method's stage list, with each stage's directory known before anything runs."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.stages: list[Stage] = []
        self.dirs: dict[str, Path] = {}

    def add(self, stage: Stage) -> Path:
        if stage.name in self.dirs:
            raise ValueError(f"stage name {stage.name!r} used twice")
        path = stage_dir(self.run.run_dir, len(self.stages), stage)
        self.stages.append(stage)
        self.dirs[stage.name] = path
        return path

    def __getitem__(self, name: str) -> Path:
        return self.dirs[name]


def method_key(run: RunContext, method: str, options: MethodOptions, teacher: Stage) -> dict[str, Any]:
    """What every stage of a method depends on: the teacher's key (data, split, model, train, seed),
    the unlabeled stems, the selection metric and the method's options. Stage keys add their name."""
    return {"method": method, "options": options.model_dump(mode="json"), "teacher": teacher.key,
            "unlabeled": list(run.splits.unlabeled), "val_metric": run.val_metric, "seed": run.config.seed}


def training_stage(run: RunContext, name: str, *, task: Callable[[], Any],
                   steps: int | Callable[[], int] | None, key: dict[str, Any] | None,
                   record: Callable[[], dict[str, Any]] | None = None) -> Stage:
    """A training stage: global RNGs seeded from the stage (a fresh start does not depend on what ran
    before in this process), ``record()`` written to ``training_set.json``, then :func:`fit` (resumes)."""

    def work(path: Path) -> None:
        seed_everything(run.stage_seed(name))
        if record is not None and run.dist.is_main:
            atomic_write_text(path / "training_set.json", json.dumps(record(), indent=1))
        fit(run, task(), path, steps=steps() if callable(steps) else steps)

    return Stage(name, work, key=key)


def best_checkpoint(stage: Path) -> Path:
    return stage / "checkpoints" / "best.pt"


def quality_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures of a round's stats the diagnostics table keeps."""
    q = stats.get("quality") or {}
    keep = ("foreground_dice", "foreground_iou", "miou", "pixel_accuracy", "scored_pixels")
    return {"coverage": stats.get("coverage"), **{k: q.get(k) for k in keep if k in q}}


def rounds_quality(run: RunContext, rounds: Sequence[Path]) -> dict[str, Any]:
    """Quality of several rounds pooled (e.g. both ATSO halves), scored like the store scores one round:
    selected pixels only, against the unlabeled ground truth (benchmark mode)."""
    gt = run.unlabeled_ground_truth()
    assert gt.masks is not None
    where = {s: i for i, s in enumerate(gt.stems)}
    c = run.classes.num_classes
    cm, fg_index = ConfusionMatrix(c), foreground_index(run.classes)
    fg = ForegroundScores(fg_index) if fg_index is not None else None
    selected = total = 0
    for path in rounds:
        rnd = load_round(path)
        for stem in rnd.stems:
            if stem not in where:
                continue
            label = rnd.labels(stem)
            target = np.where(label == IGNORE_INDEX, IGNORE_INDEX, np.asarray(gt.masks[where[stem]])).astype(np.uint8)
            pred = np.where(label == IGNORE_INDEX, 0, label).astype(np.uint8)
            cm.update(pred, target)
            if fg is not None:
                fg.update(pred, target, stems=[stem])
            selected, total = selected + int((label != IGNORE_INDEX).sum()), total + label.size
    out: dict[str, Any] = {"coverage": selected / total if total else None, "miou": cm.miou(),
                           "pixel_accuracy": cm.pixel_accuracy(), "scored_pixels": cm.total}
    if fg is not None:
        s = fg.summary()
        out.update(foreground_dice=s["dice"], foreground_iou=s["iou"])
    return out


def _headline(result: Any, metric: str) -> dict[str, Any]:
    d = result.to_dict()
    out = {k: d.get(k) for k in ("dice", "iou", "miou", "pixel_accuracy")}
    try:
        out["headline"] = result.headline(metric)
    except KeyError:
        out["headline"] = result.headline()
    return out


def scores_on_test(run: RunContext, model: nn.Module) -> dict[str, Any] | None:
    """Test figures of a model at original resolution, as ``results.json`` reports them (diagnostics
    only: never used to select anything)."""
    if not run.splits.test:
        return None
    cfg = run.config
    res = evaluate_source(model, run.source, run.splits.test, protocol=cfg.eval.protocol,
                          size=tuple(cfg.data.size), window=cfg.eval.window, stride=cfg.eval.stride,
                          device=run.device)
    return _headline(res, run.val_metric)


def scores_on_reference(run: RunContext, model: nn.Module, stems: Sequence[str]) -> dict[str, Any] | None:
    """A model's accuracy on unlabeled images (``stems``) against their ground truth (benchmark mode)."""
    gt = run.unlabeled_ground_truth()
    wanted = set(stems)
    idx = [i for i, s in enumerate(gt.stems) if s in wanted]
    if not idx or gt.masks is None:
        return None
    res = evaluate_arrays(model, np.asarray(gt.images[idx]), np.asarray(gt.masks[idx]), classes=run.classes,
                          device=run.device, stems=[gt.stems[i] for i in idx])
    return _headline(res, run.val_metric)


def best_val(stage: Path) -> float | None:
    """The best validation score a training stage reached (None without a best checkpoint)."""
    path = best_checkpoint(stage)
    return float(load_checkpoint(path)["metric"]) if path.exists() else None


def diagnostics_stage(run: RunContext, rows: Callable[[], list[dict[str, Any]]], *, note: str) -> Stage:
    """The last stage in benchmark mode: the per-generation table into the stage dir (``metrics.jsonl``,
    ``diagnostics.json``) and ``run_dir/diagnostics.json`` (merged into ``results.json`` by the api)."""

    def work(path: Path) -> None:
        if not run.dist.is_main:
            return
        table = rows()
        doc = {"note": note, "val_metric": run.val_metric, "generations": table}
        text = json.dumps(doc, indent=1, default=float)
        atomic_write_text(path / "metrics.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in table))
        atomic_write_text(path / "diagnostics.json", text)
        atomic_write_text(run.run_dir / "diagnostics.json", text)

    return Stage("diagnostics", work, key=None)


# ----------------------------------------------------------------------------- generation loop
class GenerationOptions(MethodOptions):
    generations: int = Field(5, ge=1, description=(
        f"T, generations after the supervised model M0; {UNVERIFIED}. The paper's NIH tables run 5 "
        "(self-learning peaks after 2, STSO after 4, ATSO after 3-5; 4 in the NIH->MSD transfer)"))
    generation_steps: int | None = Field(None, gt=0, description=(
        f"optimizer steps per student (None: train.steps, the supervised budget); {UNVERIFIED}: the "
        "paper trains every student with the regular supervised procedure"))
    teacher: Literal["best", "last"] = Field("best", description=(
        f"which checkpoint of a student becomes the next teacher; {UNVERIFIED} ('the trained student'); "
        "best = best on validation, as every other staged method here"))
    oversample_labeled: bool = Field(True, description=(
        f"{UNVERIFIED}: the paper trains on S ∪ R; true repeats the labeled images ceil(U/L) times as "
        "ST/ST++ do so that both parts weigh alike, false is the plain union"))
    strong_aug: bool = Field(False, description=(
        f"{UNVERIFIED}: ST++'s strong augmentation on pseudo-labeled images; the paper mentions none"))
    tta_scales: list[float] = Field([1.0], description=(
        f"labelling TTA scales; {UNVERIFIED}: no TTA in the paper"))
    tta_flip: bool = Field(False, description=f"labelling TTA horizontal flip; {UNVERIFIED}")


class AtsoOptions(GenerationOptions):
    final_relabel: bool = Field(True, description=(
        f"{UNVERIFIED}: relabel both halves with generation T's models before the final model "
        "(Table 4: 'updated R_t' after G_t is the cross-labels of G_t's models); false reads Algorithm 1 "
        "literally: the final model learns the labels of generation T-1's models and generation T's "
        "half models are never used"))


def atso_halves(stems: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """The unlabeled stems split once into two fixed halves (A gets the extra one), seeded."""
    order = np.random.default_rng(seed).permutation(len(stems))
    n_a = (len(stems) + 1) // 2
    a, b = sorted(order[:n_a].tolist()), sorted(order[n_a:].tolist())
    return [stems[i] for i in a], [stems[i] for i in b]


class GenerationMethod(Method):
    """Shared loop: M0, then ``generations`` of (label, train); subclasses say who labels what."""

    options: GenerationOptions
    from_teacher: bool = False  # self-learning: the student starts from its teacher

    def plan(self) -> StagePlan:
        if getattr(self, "_plan", None) is None:
            self._plan = self._build()
        return self._plan

    def stages(self) -> list[Stage]:
        return self.plan().stages

    def final_model(self) -> nn.Module:
        return load_stage_model(self.run, self.plan()[self.final_stage])

    def trained_steps(self) -> int:
        """A student's steps; self-learning's students continue from their teachers, so its chain adds up."""
        steps = self.run.config.train.steps
        student = self.options.generation_steps or steps
        return steps + self.options.generations * student if self.from_teacher else student

    # -- building blocks ---------------------------------------------------------------------------
    def _setup(self) -> tuple[StagePlan, Stage]:
        need = 2 if self.name == "atso" else 1
        if len(self.run.splits.unlabeled) < need:
            raise ConfigError(f"method {self.name}: needs at least {need} unlabeled image(s), the split has "
                              f"{len(self.run.splits.unlabeled)} (lower split.labeled)")
        plan = StagePlan(self.run)
        teacher = supervised_stage(self.run)
        plan.add(teacher)
        self.base_key = method_key(self.run, self.name, self.options, teacher)
        self.rows: list[Callable[[], dict[str, Any]]] = []
        return plan, teacher

    def _key(self, name: str) -> dict[str, Any]:
        return {**self.base_key, "stage": name}

    def _teacher(self, plan: StagePlan, stage: str) -> nn.Module:
        return load_stage_model(self.run, plan[stage], "best" if self.options.teacher == "best" else "model")

    def _checkpoint(self, plan: StagePlan, stage: str) -> Path:
        ck = best_checkpoint(plan[stage])
        if self.options.teacher == "best" and ck.exists():
            return ck
        return plan[stage] / "checkpoints" / "last.pt"

    def _label(self, plan: StagePlan, name: str, teacher: str, stems: Sequence[str],
               previous: str | None) -> str:
        o = self.options
        plan.add(label_stage(
            self.run, name, model=lambda: self._teacher(plan, teacher), stems=list(stems), policy=SelectAll(),
            tta_scales=tuple(o.tta_scales), tta_flip=o.tta_flip, key=self._key(name),
            previous=(lambda: plan[previous]) if previous else None,
            checkpoint=lambda: self._checkpoint(plan, teacher)))
        return name

    def _loader(self, plan: StagePlan, rounds: Sequence[str], seed: int) -> EndlessLoader:
        run, o = self.run, self.options
        spec = [(plan[r], load_round(plan[r]).stems) for r in rounds]
        if o.oversample_labeled:
            ds = pseudo_dataset(run, spec, seed=seed, strong=o.strong_aug)
        else:
            pseudo = pseudo_dataset(run, spec, seed=seed, strong=o.strong_aug, labeled=False).pseudo
            lab = run.arrays("labeled")
            labeled = make_dataset(run, lab.images, lab.masks, range(len(lab.stems)), seed=seed)
            ds = PseudoLabeledDataset(labeled, pseudo)
        return make_loader(run, ds, run.config.train.batch_size, seed)

    def _train(self, plan: StagePlan, name: str, rounds: Sequence[str], init: str | None) -> str:
        """Student ``name`` on S ∪ ``rounds``; starts from stage ``init``'s teacher checkpoint or scratch."""
        run, seed = self.run, self.run.stage_seed(name)

        def task() -> SupervisedTask:
            model = new_model(run) if init is None else self._teacher(plan, init)
            return SupervisedTask(model, self._loader(plan, rounds, seed))

        def record() -> dict[str, Any]:
            return {"init": init or "scratch", "rounds": list(rounds),
                    "pseudo_stems": sorted(s for r in rounds for s in load_round(plan[r]).stems)}

        plan.add(training_stage(run, name, task=task, steps=self.options.generation_steps,
                                key=self._key(name), record=record))
        return name

    def _finish(self, plan: StagePlan, final: str) -> StagePlan:
        self.final_stage = final
        if self.run.config.data.benchmark_gt:
            rows = self.rows
            plan.add(diagnostics_stage(self.run, lambda: [r() for r in rows], note=(
                "lazy-learning table: pseudo-label quality on the reference (unlabeled) set next to each "
                "model's reference and test accuracy; test is a diagnostic, never used for selection")))
        return plan

    def _row(self, generation: int | str, labels: dict[str, list[str]], models: dict[str, str],
             plan: StagePlan, halves: dict[str, list[str]]) -> None:
        """Queue a diagnostics row: ``labels`` {part: [label stages]} trained ``models`` {part: stage}."""
        run = self.run

        def row() -> dict[str, Any]:
            out: dict[str, Any] = {"generation": generation, "pseudo_labels": {}, "models": {}}
            for part, rounds in labels.items():
                if len(rounds) == 1:
                    out["pseudo_labels"][part] = quality_summary(load_round(plan[rounds[0]]).stats)
                else:
                    out["pseudo_labels"][part] = rounds_quality(run, [plan[r] for r in rounds])
                out["pseudo_labels"][part]["rounds"] = rounds
            for part, stage in models.items():
                model = self._teacher(plan, stage)
                ref = {h: scores_on_reference(run, model, stems) for h, stems in halves.items()}
                out["models"][part] = {"stage": stage, "val": best_val(plan[stage]), "reference": ref,
                                       "test": scores_on_test(run, model)}
            return out

        self.rows.append(row)

    def _build(self) -> StagePlan:
        """Self-learning / STSO: generation t labels every unlabeled image with M_{t-1}."""
        plan, teacher = self._setup()
        stems = list(self.run.splits.unlabeled)
        every = {"all": stems}
        prev_model, prev_round = teacher.name, None
        self._row(0, {}, {"M0": teacher.name}, plan, every)
        for t in range(1, self.options.generations + 1):
            rnd = self._label(plan, f"label-{t}", prev_model, stems, prev_round)
            student = self._train(plan, f"student-{t}", [rnd], prev_model if self.from_teacher else None)
            self._row(t, {"all": [rnd]}, {"student": student}, plan, every)
            prev_model, prev_round = student, rnd
        return self._finish(plan, prev_model)


@register
class SelfLearning(GenerationMethod):
    name = "self-learning"
    summary = "offline self-training for T generations, each student fine-tuned from its teacher"
    paper = ("Huo et al., ATSO (arXiv 2006.13461 / CVPR 2021), the 'self-learning' baseline; no public code: "
             "paper-derived, unverified")
    options_model = GenerationOptions
    from_teacher = True


@register
class Stso(GenerationMethod):
    name = "stso"
    summary = "synchronous teacher-student optimisation: like self-learning, every student from scratch"
    paper = "Huo et al., ATSO (arXiv 2006.13461 / CVPR 2021), STSO; no public code: paper-derived, unverified"
    options_model = GenerationOptions


@register
class Atso(GenerationMethod):
    name = "atso"
    summary = "asynchronous teacher-student optimisation: two fixed halves, each labeled by the other's model"
    paper = ("Huo et al., ATSO (arXiv 2006.13461 / CVPR 2021), Algorithm 1; no public code: "
             "paper-derived, unverified")
    options_model = AtsoOptions

    def halves(self) -> tuple[list[str], list[str]]:
        return atso_halves(list(self.run.splits.unlabeled), self.run.stage_seed("atso-halves"))

    def _build(self) -> StagePlan:
        plan, teacher = self._setup()
        a, b = self.halves()
        halves = {"A": a, "B": b}
        model = {"A": teacher.name, "B": teacher.name}  # M^A_0 = M^B_0 = M0
        latest: dict[str, str] = {}  # half -> its newest label stage (generations >= 1: always set below)
        self._row(0, {}, {"M0": teacher.name}, plan, halves)
        other = {"A": "B", "B": "A"}
        for t in range(1, self.options.generations + 1):
            for h in ("A", "B"):  # half h is labeled by the model trained on the other half
                latest[h] = self._label(plan, f"label-{t}{h}", model[other[h]], halves[h], latest.get(h))
            for h in ("A", "B"):
                model[h] = self._train(plan, f"student-{t}{h}", [latest[h]], None)
            both = [latest["A"], latest["B"]]
            self._row(t, {"A": [latest["A"]], "B": [latest["B"]], "A+B": both}, dict(model), plan, halves)
        if self.options.final_relabel:
            for h in ("A", "B"):
                latest[h] = self._label(plan, f"label-final{h}", model[other[h]], halves[h], latest[h])
        both = [latest["A"], latest["B"]]
        final = self._train(plan, "final", both, None)
        self._row("final", {"A+B": both}, {"final": final}, plan, halves)
        return self._finish(plan, final)
