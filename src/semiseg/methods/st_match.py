"""``st++match``: ST++'s reliable-first offline pseudo labels, then a UniMatch stage that starts from ST++'s
last student (ours, issue 28; built from the two paper families that gain most on polyp).

Why: ST++ learns from a fixed set of pseudo labels, chosen reliable images first; UniMatch perturbs images and
features online and keeps re-labelling with the network it trains. The first gives a good student, the second a
way to keep improving it on the unlabeled images once the offline labels are learned.

Algorithm:

1. ST++ as ``st++`` runs it (its options, its stages, shared with an ``st++`` run of the same settings under one
   ``out_dir``): supervised teacher with snapshots, stability ranking, the reliable half labelled and learned,
   the unreliable half labelled by that student, a student on labeled + all pseudo labels;
2. an online stage initialised from that student's best-on-validation weights, trained for ``online_scale`` x
   ``train.steps`` steps at ``online_lr_scale`` x ``train.lr``, one UniMatch step each
   (:class:`~semiseg.methods.unimatch.UniMatchTask`: weak labels strong under CutMix, plus the feature-perturbed
   weak view, the threshold rule of ``fixmatch``). With ``offline_targets`` its labeled stream is the last
   student's own training set (labeled images oversampled + ST++'s pseudo labels, strongly augmented), so the
   offline labels stay a target while the online ones refine them; without, the labeled images only.

The delivered model is the online stage's best on validation; its compute-matched control counts ST++'s
student steps too (:meth:`Method.trained_steps`).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from semiseg.engine.task import Optimized
from semiseg.methods.fixmatch import weak_strong_streams
from semiseg.methods.offline import student_loader
from semiseg.methods.registry import MethodOptions, register
from semiseg.methods.self_training import STPlusPlus, STPlusPlusOptions
from semiseg.methods.unimatch import UniMatchOptions, UniMatchTask
from semiseg.pipeline.plan import Pipeline, StageInputs


class STMatchOptions(STPlusPlusOptions, UniMatchOptions):
    online_scale: float = Field(1.0, gt=0, description=(
        "steps of the online (UniMatch) stage as a multiple of train.steps"))
    online_lr_scale: float = Field(1.0, gt=0, description=(
        "the online stage's learning rate as a multiple of train.lr (it starts from a trained student)"))
    offline_targets: bool = Field(True, description=(
        "the online stage's labeled stream is ST++'s last training set (labeled + pseudo-labeled, strong views "
        "on the pseudo-labeled); false: the labeled images only, as UniMatch"))


ONLINE_OPTIONS = (*(name for name in UniMatchOptions.model_fields if name not in MethodOptions.model_fields),
                  "online_lr_scale", "offline_targets", "strong_aug")


@register
class STMatch(STPlusPlus):
    name = "st++match"
    summary = "ST++'s reliable-first pseudo labels, then UniMatch from its last student (ours)"
    paper = "semiseg (issue 28): ST++ (CVPR 2022) followed by UniMatch (CVPR 2023)"
    options_model: ClassVar[type[MethodOptions]] = STMatchOptions
    options: STMatchOptions

    def plan(self, p: Pipeline) -> None:
        run = self.run
        student, rounds, stability = self.staged(p)
        seed, views = run.stage_seed("online"), self.options.strong_views

        def task(stage: StageInputs) -> UniMatchTask:
            o = stage.options
            streams = weak_strong_streams(run, seed, o, views)
            if o.offline_targets:
                streams["labeled"] = student_loader(run, rounds, seed, strong=o.strong_aug)
            assert stage.init is not None
            online = UniMatchTask(stage.init.resolve().model(which="best"), streams, stage, seed=seed + 3,
                                  rank=run.dist.rank, views=views)
            online.optimized = [Optimized("model", lr=run.config.train.lr * o.online_lr_scale)]
            return online

        p.train("online", task, options=ONLINE_OPTIONS, steps=round(self.options.online_scale * run.config.train.steps),
                init=student, inputs=[ref for ref, _ in rounds])
        self.diagnose(p, stability)
