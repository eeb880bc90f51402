"""``ensemble-st``: a student self-trained on the labels of two teachers from the two paper families that gain
most on polyp, an ST++ student and a UniMatch network, averaged (ours, issue 28).

Why: the two learn from the unlabeled images in different ways (ST++ offline, from a fixed reliable-first set of
pseudo labels; UniMatch online, from its own weak-view predictions under image and feature perturbation), so their
mistakes differ and their mean is a better labeller than either: the lever ATSO's alternating students pull
(better labels, then a student from scratch on them).

Algorithm:

1. ST++ as ``st++`` runs it (its options, its stages, shared with an ``st++`` run of the same settings under one
   ``out_dir``): supervised teacher with snapshots, stability ranking, reliable half labelled and learned, the
   unreliable half labelled by that student, a student S on labeled + all pseudo labels;
2. UniMatch as ``unimatch`` runs it (its options, its one stage, shared with a ``unimatch`` run likewise): a network
   U trained online from the shared initialisation;
3. every unlabeled image labelled by the mean of S's and U's softmax probabilities (each TTA-fused as ST++ labels:
   ``tta_scales``, ``tta_flip``), hard argmax, no threshold;
4. a student from scratch (``student_init``) on labeled + those labels, ST++'s strong view on the pseudo-labelled
   images (``strong_aug``), as long as ST++'s students (``retrain_scale`` / ``retrain_steps``); with
   ``student_cutmix`` > 0 its batches are CutMixed within themselves (labeled and pseudo-labeled images mix);
   with ``student_average`` the delivered student is the moving average of its weights.

5. with ``ensemble_rounds`` > 1, steps 3-4 again: the newest student takes S's place beside U (ST++'s appendix-B
   re-labelling rounds, with the ensemble as labeller).

With ``teachers``, other registered methods' delivered models join S and U in step 3, each planned inside the run
as its own run plans it (its stages shared with a run of it under one ``out_dir``).

The delivered model is the last student; its compute-matched control counts its own steps (it starts from the
shared initialisation, as ST++'s students do), so its row is compared with the same control as ``st++``'s.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, ValidationError, field_validator

from semiseg.config import RunConfig
from semiseg.errors import ConfigError
from semiseg.methods.fixmatch import train_weak_strong
from semiseg.methods.registry import Method, MethodOptions, get_method, register
from semiseg.methods.self_training import STPlusPlus, STPlusPlusOptions
from semiseg.methods.unimatch import UniMatchOptions, UniMatchTask
from semiseg.pipeline.plan import Pipeline, StageRef


class EnsembleSTOptions(STPlusPlusOptions, UniMatchOptions):
    """ST++'s options (its stages and the final student), UniMatch's (its stage), and the number of rounds."""

    ensemble_rounds: int = Field(1, ge=1, description=(
        "label-and-retrain rounds with the two teachers; each round after the first labels with the newest student "
        "in place of ST++'s (ours; 1 = one ensemble labelling; 2 did not pay on polyp validation, polyp-notes.md)"))
    student_cutmix: float = Field(0.0, ge=0, le=1, description=(
        "probability per image that the ensemble student's batch image gets a CutMix box (UniMatch's shape: area "
        "U(0.02, 0.4) of the image, aspect U(0.3, 3.3)) pasted from the next image of its batch, with its label, "
        "so labeled and pseudo-labeled images mix (ours; 0 = none, as ST++'s students; polyp-notes.md)"))
    student_average: list[float] = Field([], description=(
        "EMA momenta per step of moving averages of the ensemble student's weights (and BN statistics): the first "
        "is validated, selected and delivered, the raw student and the others are validated alongside "
        "(val_student/..., val_average<m>/...) for comparison (ours; [] = the raw student, as ST++'s; the best 0.995 "
        "average validated 0.7 under the best raw checkpoint on polyp, polyp-notes.md)"))

    teachers: dict[str, dict[str, Any]] = Field({}, description=(
        "more labellers beside S and U: registered method -> its options (as in a bench protocol), e.g. "
        "{atso: {generations: 1, generation_scale: 2}}; each is planned inside this run as its own run plans "
        "it (stages `<method>.<stage>`, shared with a run of it under the same out_dir) and its delivered "
        "model's probabilities join the mean (ours; {} = S and U only: on polyp mean-teacher as a third lowered "
        "the student's validation by 0.4, atso raised it by 0.4 and lost 0.8 on test, polyp-notes.md)"))

    @field_validator("teachers")
    @classmethod
    def _teachers(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            teacher_options(name, v[name])  # raises ValueError naming the method and the option
        return v

    @field_validator("student_average")
    @classmethod
    def _momenta(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or len(set(v)) != len(v):
            raise ValueError("momenta must be distinct and in (0, 1)")
        return v


def teacher_options(name: str, options: dict[str, Any]) -> MethodOptions:
    """``name``'s options model validating ``options`` (a ValueError naming the teacher otherwise)."""
    if name == EnsembleST.name:
        raise ValueError(f"{name}: a method cannot be its own teacher")
    try:
        method = get_method(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    try:
        return method.options_model.model_validate({"name": name, **(options or {})})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{name}: {problems}") from None


# the UniMatch stage declares exactly what a `unimatch` run's stage declares (ALL of UniMatch's), so its key is the same
UNIMATCH_OPTIONS = tuple(UniMatchOptions.option_names())


@register
class EnsembleST(STPlusPlus):
    name = "ensemble-st"
    summary = "a student on the mean labels of an ST++ student and a UniMatch network (ours)"
    paper = "semiseg (issue 28): ST++ (CVPR 2022) and UniMatch (CVPR 2023) as one labeller"
    options_model: ClassVar[type[MethodOptions]] = EnsembleSTOptions
    options: EnsembleSTOptions

    @classmethod
    def check_config(cls, config: RunConfig, options: EnsembleSTOptions) -> None:
        super().check_config(config, options)
        for name, method in cls.teacher_methods(options).items():
            try:
                method.check_config(config, method.options)
            except ConfigError as err:
                raise ConfigError(f"method.teachers.{name}: {err}") from None

    @staticmethod
    def teacher_methods(options: EnsembleSTOptions, run: Any = None) -> dict[str, Method]:
        """The ``teachers`` methods with their options (bound to ``run`` when planning)."""
        return {name: get_method(name)(run, teacher_options(name, o)) for name, o in options.teachers.items()}

    def plan(self, p: Pipeline) -> None:
        student, rounds, stability = self.staged(p)
        online = self.unimatch(p)
        extra = [method.teach(p) for method in self.teacher_methods(self.options, self.run).values()]
        stems = list(self.run.splits.unlabeled)
        previous = [ref for ref, _ in rounds]
        for r in range(1, self.options.ensemble_rounds + 1):
            suffix = "" if r == 1 else f"-{r}"
            labels = self.label(p, f"label-ensemble{suffix}", teacher=[student, online, *extra], stems=stems,
                                previous=previous)
            student = self.retrain(p, f"retrain-ensemble{suffix}", rounds=[(labels, stems)], teacher=student,
                                   n_pseudo=len(stems), cutmix=self.options.student_cutmix,
                                   averages=self.options.student_average)
            previous = [labels]
        self.diagnose(p, stability)

    def unimatch(self, p: Pipeline) -> StageRef:
        """UniMatch's stage, as the ``unimatch`` method plans it."""
        return train_weak_strong(p, "unimatch", UniMatchTask, self.options.strong_views, options=UNIMATCH_OPTIONS)
