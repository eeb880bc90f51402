"""The generic labelling stage of every staged method, and training sets built from its rounds.

API (stable; other staged methods import it):

``label_work(run, *, model, stems, policy, tta_scales, tta_flip, batch_size, previous, checkpoint)``
    The work of a label stage (methods declare one with :meth:`semiseg.pipeline.plan.Pipeline.label`): it
    predicts the unlabeled images ``stems`` (by stem; pixels from ``run.arrays("unlabeled")``) with
    ``model()`` through a streaming :class:`~semiseg.pseudo.labeler.Labeler` (``tta_scales`` × optional
    horizontal flip; bounded memory whatever the set size), fits ``policy`` first when ``policy.needs_fit``
    (a second streaming pass; the caller's policy object is copied, never mutated), and writes ONE round
    named :data:`ROUND` into the stage directory through :class:`~semiseg.pseudo.store.PseudoLabelStore`:
    uint8 labels + confidence at the working size, provenance (model state hash, ``checkpoint()`` path +
    hash, policy name + fitted params, TTA), stats (coverage, class shares, confidence, flip rate against
    ``previous()``'s round(s), and ground-truth quality only when ``run.config.data.benchmark_gt``). The
    round becomes visible atomically, so a process killed while labelling leaves no DONE round and the
    resumed stage labels again from scratch. The callables are evaluated when the stage runs, because they
    read upstream stages. ``labeling_params`` is what the labels depend on besides model and stems.

``load_round(stage_dir) -> PseudoRound``
    The round a finished label stage wrote.

``pseudo_dataset(run, rounds, *, seed, strong=True, labeled=True) -> PseudoLabeledDataset``
    A training set of the labeled images (ground truth, weak augmentation, repeated ``ceil(U / L)``
    times as ST/ST++ do: ``labeled * ceil(U / L) + pseudo``) plus the pseudo-labeled images listed by
    ``rounds`` (``[(stage_dir_or_round_dir, stems), ...]``; labels from the store, pixels from the
    unlabeled arrays) with the weak augmentation and, when ``strong``, ST++'s strong augmentation on the
    pseudo-labeled images only. Items are ``{"image", "mask", "index", "pseudo"}`` so a plain
    cross-entropy step (``SupervisedTask``) trains on it; feed it to one shuffled loader.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from semiseg.data.classes import IGNORE_INDEX
from semiseg.data.datasets import SegmentationDataset, repeat_to
from semiseg.errors import ConfigError, DataError
from semiseg.layout import ROUND
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.training import make_dataset
from semiseg.progress import progress_bar
from semiseg.pseudo.labeler import Labeler
from semiseg.pseudo.policies import Policy
from semiseg.pseudo.store import PseudoLabelStore, PseudoRound, make_provenance, state_dict_hash

"""Name of the one round a label stage writes into its stage directory."""

SIZE_DIVISOR = 32
"""Views are padded to a multiple of it before the model (smp encoders downsample 5 times)."""

Stems = Sequence[str] | Callable[[], Sequence[str]]


# ------------------------------------------------------------------------------------------ rounds
def round_dir(path: Path) -> Path:
    """``path`` itself when it is a round, else the label stage's round inside it."""
    path = Path(path)
    return path if (path / "stems.txt").is_file() else path / ROUND


def load_round(stage_dir: Path) -> PseudoRound:
    """The finished round of a label stage (``stage_dir/pseudo``), or a round directory itself."""
    return PseudoRound(round_dir(stage_dir))


class MergedRounds:
    """Several rounds seen as one for flip-rate statistics (ST++: reliable + unreliable rounds)."""

    def __init__(self, rounds: Sequence[PseudoRound]) -> None:
        self.rounds = list(rounds)
        self.name = "+".join(r.name if r.path.name != ROUND else r.path.parent.name for r in self.rounds)

    def __contains__(self, stem: object) -> bool:
        return any(stem in r for r in self.rounds)

    def labels(self, stem: str) -> np.ndarray:
        for r in self.rounds:
            if stem in r:
                return r.labels(stem)
        raise DataError(f"{self.name}: no pseudo label for stem {stem!r}")


def _previous(paths: Path | Sequence[Path] | None) -> PseudoRound | MergedRounds | None:
    if paths is None:
        return None
    if isinstance(paths, str | Path):
        return load_round(Path(paths))
    rounds = [load_round(Path(p)) for p in paths]
    return rounds[0] if len(rounds) == 1 else MergedRounds(rounds)


# ------------------------------------------------------------------------------------------- stage
def _resolve(stems: Stems) -> list[str]:
    return [str(s) for s in (stems() if callable(stems) else stems)]


def unlabeled_index(run: RunContext, stems: Sequence[str]) -> list[int]:
    """Positions of ``stems`` in ``run.arrays("unlabeled")``; a stem not in that split is an error."""
    where = {s: i for i, s in enumerate(run.arrays("unlabeled").stems)}
    missing = [s for s in stems if s not in where]
    if missing:
        raise DataError(f"{len(missing)} stems to label are not unlabeled images of this run "
                        f"(e.g. {missing[0]!r})")
    return [where[s] for s in stems]


def make_labeler(run: RunContext, model: nn.Module, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                 batch_size: int | None = None) -> Labeler:
    """The run's labeler: its device, AMP on CUDA, views padded to :data:`SIZE_DIVISOR`."""
    return Labeler(model, scales=scales, flip=flip, batch_size=batch_size or run.config.train.batch_size,
                   device=run.device, amp=run.device.type == "cuda", size_divisor=SIZE_DIVISOR)


def ground_truth_fn(run: RunContext, stems: Sequence[str]) -> Callable[[str], np.ndarray] | None:
    """stem -> mask of the unlabeled image, in benchmark mode and when every stem has a mask."""
    if not run.config.data.benchmark_gt:
        return None
    gt = run.unlabeled_ground_truth()
    where = {s: i for i, s in enumerate(gt.stems)}
    if gt.masks is None or any(s not in where for s in stems):
        return None
    masks = gt.masks
    return lambda stem: np.asarray(masks[where[stem]])


def model_hash(model: nn.Module) -> str:
    """The store's state-dict hash; 0-dim buffers (BatchNorm's ``num_batches_tracked``) as 1-element."""
    try:
        return state_dict_hash(model)
    except RuntimeError:  # older store versions cannot byte-view a 0-dim int64 tensor
        return state_dict_hash({k: v.reshape(1) if isinstance(v, torch.Tensor) and v.ndim == 0 else v
                                for k, v in model.state_dict().items()})


def write_round(run: RunContext, stage_dir: Path, *, model: nn.Module, stems: Sequence[str], policy: Policy,
                tta_scales: Sequence[float] = (1.0,), tta_flip: bool = False,
                previous: Path | Sequence[Path] | None = None, checkpoint: Path | None = None,
                batch_size: int | None = None) -> PseudoRound:
    """Label ``stems`` into ``stage_dir/pseudo`` (see the module docstring); returns the finished round."""
    store = PseudoLabelStore(stage_dir)
    if store.has(ROUND):
        return store.load(ROUND)
    images = run.arrays("unlabeled").images
    index = unlabeled_index(run, stems)
    labeler = make_labeler(run, model, scales=tta_scales, flip=tta_flip, batch_size=batch_size)
    policy = copy.deepcopy(policy)
    show = run.config.train.progress and run.dist.is_main

    def tracked(what: str) -> Iterator[tuple[int, np.ndarray]]:  # predictions with a bar (images/s, ETA)
        with progress_bar(f"{stage_dir.name}: {what}", len(index), enabled=show, console=run.console) as update:
            for k, item in enumerate(labeler.iter_predictions(images, index)):
                yield item
                update(k + 1, len(index))

    if policy.needs_fit and index:
        policy.fit(p for _, p in tracked("fit policy"))
    prov = make_provenance(checkpoint=checkpoint, policy=policy, labeler=labeler,
                           model_sha256=model_hash(model), stage=stage_dir.name, num_stems=len(stems))
    stem_of = dict(zip(index, stems, strict=True))
    with store.writer(ROUND, prov, previous=_previous(previous), ground_truth=ground_truth_fn(run, stems),
                      num_classes=run.classes.num_classes, overwrite=True) as w:
        for i, probs in tracked("pseudo labels"):
            label, conf = policy(probs)
            w.add(stem_of[i], label, conf)
    return store.load(ROUND)


def labeling_params(run: RunContext, policy: Policy, tta_scales: Sequence[float], tta_flip: bool) -> dict[str, Any]:
    """What a round's labels depend on besides the model and the stems (part of a label stage's key)."""
    if not tta_scales or any(s <= 0 for s in tta_scales):
        raise ConfigError(f"tta scales must be positive numbers, got {list(tta_scales)}")
    return {"policy": policy.name, "policy_params": policy.params(), "tta_scales": [float(s) for s in tta_scales],
            "tta_flip": bool(tta_flip), "size_divisor": SIZE_DIVISOR, "benchmark_gt": run.config.data.benchmark_gt}


def label_work(run: RunContext, *, model: Callable[[], nn.Module], stems: Stems, policy: Policy,
               tta_scales: Sequence[float], tta_flip: bool, batch_size: int | None,
               previous: Callable[[], Sequence[Path] | None],
               checkpoint: Callable[[], Path | None]) -> Callable[[Path], None]:
    """The work of a label stage (:meth:`semiseg.pipeline.plan.Pipeline.label`): one writer, the main rank; the
    runner's barrier makes the round visible to every rank. The callables read upstream stages when it runs."""

    def work(stage_dir: Path) -> None:
        if not run.dist.is_main:
            return
        write_round(run, stage_dir, model=model(), stems=_resolve(stems), policy=policy, tta_scales=tta_scales,
                    tta_flip=tta_flip, previous=previous(), checkpoint=checkpoint(), batch_size=batch_size)

    return work


# ----------------------------------------------------------------------------------------- dataset
class PseudoLabeledDataset(Dataset):
    """Labeled items then pseudo-labeled items, each from its own :class:`SegmentationDataset`.

    A pseudo-labeled item with strong augmentation returns the strong view as ``image`` and its mask
    (255 inside a cutout) as ``mask``: ST/ST++ train on the strong view only. ``set_epoch`` reaches both
    parts, so augmentation stays a pure function of (seed, epoch, item) and a resumed run replays.
    """

    def __init__(self, labeled: SegmentationDataset | None, pseudo: SegmentationDataset | None) -> None:
        self.labeled, self.pseudo = labeled, pseudo
        self.n_labeled = len(labeled) if labeled is not None else 0
        self.n_pseudo = len(pseudo) if pseudo is not None else 0
        if self.n_labeled + self.n_pseudo == 0:
            raise DataError("a pseudo-labeled training set needs labeled or pseudo-labeled images")

    def __len__(self) -> int:
        return self.n_labeled + self.n_pseudo

    def set_epoch(self, epoch: int) -> None:
        for part in (self.labeled, self.pseudo):
            if part is not None:
                part.set_epoch(epoch)

    def __getitem__(self, k: int) -> dict[str, Any]:
        k = int(k) % len(self)
        if k < self.n_labeled:
            item = self.labeled[k]  # type: ignore[index]
            return {"image": item["image"], "mask": item["mask"], "index": item["index"], "pseudo": 0}
        item = self.pseudo[k - self.n_labeled]  # type: ignore[index]
        if "image_strong" in item:
            return {"image": item["image_strong"], "mask": item["mask_strong"], "index": item["index"],
                    "pseudo": 1}
        return {"image": item["image"], "mask": item["mask"], "index": item["index"], "pseudo": 1}


def pseudo_masks(run: RunContext,
                 rounds: Sequence[tuple[Path, Sequence[str]]]) -> tuple[np.ndarray, list[int]]:
    """An ``U×H×W`` mask array over the unlabeled images (255 where nothing is used) filled from
    ``rounds``, and the unlabeled indices it labels, in the order given. A stem given twice is an error."""
    unl = run.arrays("unlabeled")
    masks = np.full(unl.images.shape[:3], IGNORE_INDEX, dtype=np.uint8)
    where = {s: i for i, s in enumerate(unl.stems)}
    used: list[int] = []
    seen: set[str] = set()
    for path, stems in rounds:
        rnd = load_round(Path(path))
        for stem in stems:
            if stem in seen:
                raise DataError(f"{rnd.path}: stem {stem!r} is pseudo-labeled twice in one training set")
            if stem not in where:
                raise DataError(f"{rnd.path}: {stem!r} is not an unlabeled image of this run")
            label = rnd.labels(stem)
            if label.shape != masks.shape[1:]:
                raise DataError(f"{rnd.path}: label of {stem!r} is {label.shape}, the working size is "
                                f"{masks.shape[1:]}")
            seen.add(stem)
            masks[where[stem]] = label
            used.append(where[stem])
    return masks, used


def pseudo_dataset(run: RunContext, rounds: Sequence[tuple[Path, Sequence[str]]], *, seed: int,
                   strong: bool = True, labeled: bool = True) -> PseudoLabeledDataset:
    """Labeled (× ``ceil(U / L)``) + pseudo-labeled images for one shuffled loader (module docstring)."""
    masks, used = pseudo_masks(run, rounds)
    unl = run.arrays("unlabeled")
    pseudo = None
    if used:
        pseudo = make_dataset(run, unl.images, masks, used, seed=seed + 1, strong=strong)
    lab = None
    if labeled:
        arrays = run.arrays("labeled")
        n = len(arrays.stems)
        if n:
            reps = repeat_to(range(n), len(used)) if used else list(range(n))
            lab = make_dataset(run, arrays.images, arrays.masks, reps, seed=seed)
    return PseudoLabeledDataset(lab, pseudo)


def oversampled_size(n_labeled: int, n_pseudo: int) -> int:
    """ST/ST++'s training-set size ``L * ceil(U / L) + U`` (``L`` when there is nothing pseudo-labeled)."""
    if n_labeled == 0:
        return n_pseudo
    return n_labeled * max(1, math.ceil(n_pseudo / n_labeled)) + n_pseudo
