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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import Field

from semiseg.errors import ConfigError
from semiseg.methods.offline import label_all, student_steps, train_student
from semiseg.methods.registry import Method, MethodOptions, register
from semiseg.methods.supervised import train_supervised
from semiseg.pipeline.diagnostics import (
    add_diagnostics,
    quality_summary,
    rounds_quality,
    scores_on_reference,
    scores_on_test,
)
from semiseg.pipeline.plan import Pipeline, StageRef

UNVERIFIED = "paper-derived, unverified (no public ATSO code exists)"


# ----------------------------------------------------------------------------- generation loop
class GenerationOptions(MethodOptions):
    generations: int = Field(5, ge=1, description=(
        f"T, generations after the supervised model M0; {UNVERIFIED}. The paper's NIH tables run 5 "
        "(self-learning peaks after 2, STSO after 4, ATSO after 3-5; 4 in the NIH->MSD transfer)"))
    generation_steps: int | None = Field(None, gt=0, description=(
        "optimizer steps per student; overrides generation_scale and the epoch rule"))
    generation_scale: float | None = Field(None, gt=0, description=(
        "steps per student as a multiple of train.steps. null (default, with generation_steps null): the epoch "
        f"rule, as many epochs over the student's set (labeled + its pseudo-labeled images) as the supervised "
        f"M0 ran over the labeled ones; {UNVERIFIED}: the paper trains every student with 'the regular "
        "supervised procedure', so a student on 20x the images gets 20x the steps. A student held to the "
        "teacher's steps re-learns its teacher: on polyp split seed 0 an stso student validated at 0.711 with "
        "1000 steps and 0.752 with 2000 (issue 25, polyp-notes.md)"))
    teacher: Literal["best", "last"] = Field("best", description=(
        f"which checkpoint of a student becomes the next teacher; {UNVERIFIED} ('the trained student'); "
        "best = best on validation, as every other staged method here"))
    oversample_labeled: bool = Field(True, description=(
        f"{UNVERIFIED}: the paper trains on S ∪ R; true repeats the labeled images ceil(U/L) times as "
        "ST/ST++ do so that both parts weigh alike, false is the plain union"))
    strong_aug: bool = Field(True, description=(
        "ST++'s strong augmentation (colour jitter, grey, blur, cutout) of the pseudo-labeled images, which "
        "ST++ calls vital (its Fig. 3a): without it a student re-learns its teacher's mistakes, the lazy "
        "learning ATSO is about. Our addition, on by default; the ATSO paper mentions no augmentation "
        "(false)"))
    tta_scales: list[float] = Field([1.0], description=(
        f"labelling TTA scales; {UNVERIFIED}: no TTA in the paper"))
    tta_flip: bool = Field(True, description=(
        "the labels fuse the prediction of the image and of its horizontal flip: the 2-D counterpart of the "
        "paper's labels, fused by majority vote over three views of a volume (section 4.1); false: one view"))


class AtsoOptions(GenerationOptions):
    final_relabel: bool = Field(True, description=(
        f"{UNVERIFIED}: relabel both halves with generation T's models before the final model "
        "(Table 4: 'updated R_t' after G_t is the cross-labels of G_t's models); false reads Algorithm 1 "
        "literally: the final model learns the labels of generation T-1's models and generation T's "
        "half models are never used"))


OptionsT = TypeVar("OptionsT", bound=GenerationOptions)


def atso_halves(stems: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """The unlabeled stems split once into two fixed halves (A gets the extra one), seeded."""
    order = np.random.default_rng(seed).permutation(len(stems))
    n_a = (len(stems) + 1) // 2
    a, b = sorted(order[:n_a].tolist()), sorted(order[n_a:].tolist())
    return [stems[i] for i in a], [stems[i] for i in b]


class GenerationMethod(Method[OptionsT]):
    """Shared loop: M0, then ``generations`` of (label, train); subclasses say who labels what."""

    from_teacher: ClassVar[bool] = False  # self-learning: the student starts from its teacher

    @property
    def which(self) -> Literal["best", "last"]:
        return self.options.teacher

    def unlabeled(self, need: int) -> list[str]:
        stems = list(self.run.splits.unlabeled)
        if len(stems) < need:
            raise ConfigError(f"method {self.name}: needs at least {need} unlabeled image(s), the split has "
                              f"{len(stems)} (lower split.labeled)")
        return stems

    def label(self, p: Pipeline, name: str, teacher: StageRef, stems: Sequence[str],
              previous: StageRef | None) -> StageRef:
        o = self.options
        return label_all(p, name, teacher=teacher, which=self.which, stems=list(stems), tta_scales=o.tta_scales,
                         tta_flip=o.tta_flip, previous=[previous] if previous else [])

    def student_steps(self, n_pseudo: int) -> int:
        """``generation_steps``, else ``generation_scale`` x ``train.steps``, else the epoch rule over the
        student's set (labeled, oversampled as the loader does, + ``n_pseudo`` pseudo-labeled images)."""
        o = self.options
        return student_steps(self.run, n_pseudo, oversample=o.oversample_labeled, fixed=o.generation_steps,
                             scale=o.generation_scale)

    def train(self, p: Pipeline, name: str, rounds: Sequence[StageRef], init: StageRef | None,
              n_pseudo: int) -> StageRef:
        """Student ``name`` on S ∪ ``rounds`` (``n_pseudo`` images); starts from ``init``'s teacher checkpoint or
        from scratch."""

        def record() -> dict[str, Any]:
            return {"init": init.name if init else "scratch", "rounds": [r.name for r in rounds],
                    "pseudo_stems": sorted(s for r in rounds for s in r.round().stems)}

        return train_student(p, name, [(r, lambda r=r: r.round().stems) for r in rounds],
                             steps=self.student_steps(n_pseudo), init=init, which=self.which,
                             oversample=self.options.oversample_labeled, record=record)

    def row(self, generation: int | str, labels: dict[str, list[StageRef]], models: dict[str, StageRef],
            halves: dict[str, list[str]]) -> Callable[[], dict[str, Any]]:
        """A diagnostics row: pseudo labels ``labels`` {part: [label stages]} trained ``models`` {part: stage}."""
        run = self.run

        def row() -> dict[str, Any]:
            out: dict[str, Any] = {"generation": generation, "pseudo_labels": {}, "models": {}}
            for part, rounds in labels.items():
                quality = (quality_summary(rounds[0].round().stats) if len(rounds) == 1
                           else rounds_quality(run, rounds))
                out["pseudo_labels"][part] = {**quality, "rounds": [r.name for r in rounds]}
            for part, stage in models.items():
                model = stage.model(which=self.which)
                ref = {h: scores_on_reference(run, model, stems) for h, stems in halves.items()}
                out["models"][part] = {"stage": stage.name, "val": stage.best_metric(), "reference": ref,
                                       "test": scores_on_test(run, model)}
            return out

        return row

    def diagnose(self, p: Pipeline, rows: list[Callable[[], dict[str, Any]]]) -> None:
        add_diagnostics(p, options=("teacher",), table=lambda: {
            "note": "lazy-learning table: pseudo-label quality on the reference (unlabeled) set next to each "
                    "model's reference and test accuracy; test is a diagnostic, never used for selection",
            "val_metric": self.run.val_metric, "generations": [row() for row in rows]})

    def plan(self, p: Pipeline) -> None:
        """Self-learning / STSO: generation t labels every unlabeled image with M_{t-1}."""
        stems = self.unlabeled(need=1)
        every = {"all": stems}
        model, labels = train_supervised(p), None
        rows = [self.row(0, {}, {"M0": model}, every)]
        for t in range(1, self.options.generations + 1):
            labels = self.label(p, f"label-{t}", model, stems, labels)
            model = self.train(p, f"student-{t}", [labels], model if self.from_teacher else None, len(stems))
            rows.append(self.row(t, {"all": [labels]}, {"student": model}, every))
        self.diagnose(p, rows)


@register
class SelfLearning(GenerationMethod[GenerationOptions]):
    name = "self-learning"
    summary = "offline self-training for T generations, each student fine-tuned from its teacher"
    paper = ("Huo et al., ATSO (arXiv 2006.13461 / CVPR 2021), the 'self-learning' baseline; no public code: "
             "paper-derived, unverified")
    from_teacher = True


@register
class Stso(GenerationMethod[GenerationOptions]):
    name = "stso"
    summary = "synchronous teacher-student optimisation: like self-learning, every student from scratch"
    paper = "Huo et al., ATSO (arXiv 2006.13461 / CVPR 2021), STSO; no public code: paper-derived, unverified"


@register
class Atso(GenerationMethod[AtsoOptions]):
    name = "atso"
    summary = "asynchronous teacher-student optimisation: two fixed halves, each labeled by the other's model"
    paper = ("Huo et al., ATSO (arXiv 2006.13461 / CVPR 2021), Algorithm 1; no public code: "
             "paper-derived, unverified")

    def halves(self) -> tuple[list[str], list[str]]:
        return atso_halves(list(self.run.splits.unlabeled), self.run.stage_seed("atso-halves"))

    def plan(self, p: Pipeline) -> None:
        self.unlabeled(need=2)
        a, b = self.halves()
        halves = {"A": a, "B": b}
        teacher = train_supervised(p)
        model = {"A": teacher, "B": teacher}  # M^A_0 = M^B_0 = M0
        latest: dict[str, StageRef] = {}  # half -> its newest label stage
        rows = [self.row(0, {}, {"M0": teacher}, halves)]
        other = {"A": "B", "B": "A"}
        for t in range(1, self.options.generations + 1):
            for h in ("A", "B"):  # half h is labeled by the model trained on the other half
                latest[h] = self.label(p, f"label-{t}{h}", model[other[h]], halves[h], latest.get(h))
            for h in ("A", "B"):
                model[h] = self.train(p, f"student-{t}{h}", [latest[h]], None, len(halves[h]))
            rows.append(self.row(t, {"A": [latest["A"]], "B": [latest["B"]], "A+B": [latest["A"], latest["B"]]},
                                 dict(model), halves))
        if self.options.final_relabel:
            for h in ("A", "B"):
                latest[h] = self.label(p, f"label-final{h}", model[other[h]], halves[h], latest[h])
        both = [latest["A"], latest["B"]]
        final = self.train(p, "final", both, None, len(a) + len(b))
        rows.append(self.row("final", {"A+B": both}, {"final": final}, halves))
        self.diagnose(p, rows)
