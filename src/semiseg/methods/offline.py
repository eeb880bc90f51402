"""The offline (staged) self-training families' shared steps: a teacher labels every given unlabeled image
(argmax, no threshold), and a student learns from the labeled images plus those pseudo labels in one shuffled
loader. ST / ST++ (``self_training``) and self-learning / STSO / ATSO (``atso``) are both made of these; they
differ in who labels what, and where each student starts from."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from semiseg.data.transforms import cutmix_boxes, paste_from_next
from semiseg.engine.hooks import EMAHook, ema
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.task import StepContext, TrainingTask
from semiseg.methods.schedules import offline_student_steps
from semiseg.methods.supervised import SupervisedTask
from semiseg.models.ema import frozen_copy
from semiseg.models.factory import unwrap
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.labeling import PseudoLabeledDataset, oversampled_size, pseudo_dataset
from semiseg.pipeline.plan import Pipeline, Source, StageInputs, StageRef, Which
from semiseg.pipeline.training import make_dataset, make_loader, new_model
from semiseg.pseudo.policies import SelectAll

Stems = Sequence[str] | Callable[[], Sequence[str]]
Round = tuple[StageRef, Stems]  # a label stage and the stems it labelled (a callable: known once upstream ran)


def label_all(p: Pipeline, name: str, *, teacher: Source | Sequence[Source], stems: Stems,
              tta_scales: Sequence[float], tta_flip: bool, which: Which = "best", batch_size: int | None = None,
              previous: Sequence[StageRef] = (), inputs: Sequence[Source] = ()) -> StageRef:
    """A label stage: ``teacher``'s hard labels of every pixel of ``stems`` (no selection), TTA-fused; several
    teachers label with their mean probabilities."""
    return p.label(name, teacher=teacher, which=which, stems=stems, policy=SelectAll(),
                   tta_scales=tuple(tta_scales), tta_flip=tta_flip, batch_size=batch_size, previous=previous,
                   inputs=inputs)


def student_steps(run: RunContext, n_pseudo: int, *, oversample: bool = True, fixed: int | None = None,
                  scale: float | None = None) -> int:
    """A student's steps: ``fixed``, else ``scale`` x ``train.steps``, else the released epoch rule over its set
    (the labeled images, oversampled as the loader does, + ``n_pseudo`` pseudo-labeled ones)."""
    cfg, n_labeled = run.config, len(run.splits.labeled)
    n_set = oversampled_size(n_labeled, n_pseudo) if oversample else n_labeled + n_pseudo
    return offline_student_steps(cfg.train.steps, cfg.train.batch_size * run.dist.world_size, n_labeled, n_set,
                                 fixed=fixed, scale=scale)


def student_loader(run: RunContext, rounds: Sequence[Round], seed: int, *, strong: bool,
                   oversample: bool = True) -> EndlessLoader:
    """Labeled + pseudo-labeled images of ``rounds`` in one shuffled loader; ``strong``: ST++'s strong view of the
    pseudo-labeled ones; ``oversample``: the labeled images repeated ceil(P / L) times so both parts weigh alike
    (ST/ST++), else the plain union."""
    spec = [(ref.path, stems() if callable(stems) else stems) for ref, stems in rounds]
    if oversample:
        ds = pseudo_dataset(run, spec, seed=seed, strong=strong)
    else:
        pseudo = pseudo_dataset(run, spec, seed=seed, strong=strong, labeled=False).pseudo
        lab = run.arrays("labeled")
        ds = PseudoLabeledDataset(make_dataset(run, lab.images, lab.masks, range(len(lab.stems)), seed=seed), pseudo)
    return make_loader(run, ds, run.config.train.batch_size, seed)


def train_student(p: Pipeline, name: str, rounds: Sequence[Round], *, steps: int, init: Source | None = None,
                  which: Which = "best", oversample: bool = True, cutmix: float = 0.0,
                  averages: Sequence[float] = (),
                  record: Callable[[], dict[str, Any]] | None = None) -> StageRef:
    """A student on labeled + ``rounds``, cross-entropy, from the shared initialisation or from ``init``'s
    ``which`` checkpoint; it reads the method's ``strong_aug``. ``cutmix``: :class:`CutMixStudentTask`'s box
    probability (0: none); ``averages``: :class:`AveragedStudent`'s momenta (empty: none). Either off, no key
    holds it, so the stages of runs from before it existed are still read back."""
    run, seed = p.run, p.run.stage_seed(name)

    def task(stage: StageInputs) -> TrainingTask:
        model = new_model(run) if stage.init is None else stage.init.resolve().model(which=which)
        loader = student_loader(run, rounds, seed, strong=stage.options.strong_aug, oversample=oversample)
        inner: TrainingTask = SupervisedTask(model, loader, loss=stage.labeled_loss)
        if cutmix:
            inner = CutMixStudentTask(model, loader, loss=stage.labeled_loss, p=cutmix, seed=seed + 3,
                                      rank=run.dist.rank)
        return AveragedStudent(inner, averages) if averages else inner

    return p.train(name, task, options=("strong_aug",), steps=steps, init=init, inputs=[ref for ref, _ in rounds],
                   variant={"init_from": which, "oversample_labeled": oversample,
                            **({"cutmix_p": cutmix} if cutmix else {}),
                            **({"weight_averages": list(averages)} if averages else {})}, record=record)


class AveragedStudent(TrainingTask):
    """``inner``'s student trained as ``inner`` trains it, validated and delivered as the moving average of its
    weights and BN statistics (``average``: momentum ``momenta[0]`` per step, warm-up ``min(1 - 1/(t+1), m)``),
    the mean of its last ~1/(1 - m) steps, which smooths the step-to-step swings a best-on-validation pick
    chases. The raw student (``student``) and the averages of the other momenta (``average<m>``) are validated
    alongside, each kept as its own best checkpoint, so one run compares them."""

    def __init__(self, inner: TrainingTask, momenta: Sequence[float]) -> None:
        self.inner = inner
        self.nets = inner.nets  # the same dict: the loop's DDP wrapping reaches the inner step
        student = self.nets[inner.eval_net_name]
        self.names = ["average"] + [f"average{m:g}" for m in momenta[1:]]
        self.hooks = list(inner.hooks)
        for i, (name, m) in enumerate(zip(self.names, momenta, strict=True)):
            self.nets[name] = frozen_copy(student)
            average = ema(student, self.nets[name], momentum=m, updates=0, warmup=True, buffers=True)
            self.hooks.append(EMAHook(average, log="average_decay" if i == 0 else None))
        self.loaders, self.optimized = inner.loaders, inner.optimized
        self.eval_net_name = "average"

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        return self.inner.train_step(batches, ctx)

    def extra_eval_nets(self) -> dict[str, nn.Module]:
        student = unwrap(self.nets[self.inner.eval_net_name])  # under torchrun the loop wrapped it in DDP
        return {"student": student, **{n: self.nets[n] for n in self.names[1:]}}

    def on_epoch_end(self, epoch: int) -> None:
        self.inner.on_epoch_end(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class CutMixStudentTask(SupervisedTask):
    """A student whose batch is CutMixed within itself: each image, with probability ``p``, gets one box of
    UniMatch's shape pasted from the next image of the batch, its label (true or pseudo) with it, so labeled and
    pseudo-labeled images mix. The boxes of a step are a pure function of (seed, rank, step): a resumed run
    replays an unbroken one."""

    def __init__(self, model: Any, loader: Any, *, loss: Any, p: float, seed: int, rank: int = 0) -> None:
        super().__init__(model, loader, loss=loss)
        self.p, self.seed, self.rank = p, seed, rank

    def train_step(self, batches: dict[str, Any], ctx: StepContext) -> dict[str, float]:
        batch = dict(batches["labeled"])
        image, mask = batch["image"], batch["mask"]
        rng = np.random.default_rng([self.seed, self.rank, ctx.step])
        boxes = cutmix_boxes(image.shape[0], *image.shape[-2:], rng, p=self.p).to(image.device)
        batch["image"], batch["mask"] = paste_from_next(boxes, image), paste_from_next(boxes, mask)
        return {**super().train_step({"labeled": batch}, ctx), "cutmix_share": boxes.float().mean().item()}
