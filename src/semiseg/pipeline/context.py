"""Everything a method needs about its run: config, data source, splits, decoded arrays, device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semiseg.config import RunConfig
from semiseg.data.cache import CachedArrays, load_arrays
from semiseg.data.splits import Splits
from semiseg.data.types import DataSource
from semiseg.engine.distributed import DistInfo
from semiseg.errors import SemisegError
from semiseg.progress import phase


class LeakageError(SemisegError):
    """Training code asked for ground truth it must not see."""


@dataclass
class RunContext:
    """One run's shared state. Unlabeled images are decoded WITHOUT masks: their ground truth is only
    reachable through :meth:`unlabeled_ground_truth`, and only in benchmark mode."""

    config: RunConfig
    run_dir: Path
    source: DataSource
    splits: Splits
    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    console: Any = None
    _arrays: dict[str, CachedArrays] = field(default_factory=dict)

    @property
    def classes(self):  # noqa: ANN201 - ClassTable
        return self.source.classes

    @property
    def val_metric(self) -> str:
        if self.config.eval.val_metric:
            return self.config.eval.val_metric
        return "dice" if self.classes.is_binary else "miou"

    @property
    def test_stems(self) -> list[str]:
        """The test split, or nothing when ``eval.test`` is off (a search run must not read test)."""
        return list(self.splits.test or []) if self.config.eval.test else []

    def _samples(self, stems: list[str]):  # noqa: ANN202
        by_stem = self.source.by_stem()
        return [by_stem[s] for s in stems]

    def arrays(self, split: str) -> CachedArrays:
        """Working-size uint8 arrays of a split: ``labeled``, ``val``, ``test`` with masks, ``unlabeled``
        without."""
        if split not in self._arrays:
            stems = getattr(self.splits, split)
            cache_dir = Path(self.config.data.cache_dir) if self.config.data.cache_dir else None
            with phase(f"decoding the {split} images", len(stems)) as update:  # a first run of a big folder
                self._arrays[split] = load_arrays(
                    self._samples(stems), self.source.decode_mask, tuple(self.config.data.size), cache_dir,
                    with_masks=split != "unlabeled", progress=update)
        return self._arrays[split]

    def unlabeled_ground_truth(self) -> CachedArrays:
        """Masks of the unlabeled images, for pseudo-label diagnostics in benchmark mode only."""
        if not self.config.data.benchmark_gt:
            raise LeakageError("unlabeled ground truth requested outside benchmark mode (data.benchmark_gt)")
        if "unlabeled_gt" not in self._arrays:
            cache_dir = Path(self.config.data.cache_dir) if self.config.data.cache_dir else None
            samples = [s for s in self._samples(self.splits.unlabeled) if s.mask is not None]
            self._arrays["unlabeled_gt"] = load_arrays(
                samples, self.source.decode_mask, tuple(self.config.data.size), cache_dir, with_masks=True)
        return self._arrays["unlabeled_gt"]

    def oracle_arrays(self) -> CachedArrays:
        """Labeled + unlabeled images WITH masks: only the oracle (the upper bound) may ask for this."""
        if "oracle" not in self._arrays:
            samples = self._samples(self.splits.labeled + self.splits.unlabeled)
            missing = [s.stem for s in samples if s.mask is None]
            if missing:
                raise LeakageError(f"the oracle needs a mask for every training image; {len(missing)} have none "
                                   f"(e.g. {missing[0]!r})")
            cache_dir = Path(self.config.data.cache_dir) if self.config.data.cache_dir else None
            self._arrays["oracle"] = load_arrays(samples, self.source.decode_mask, tuple(self.config.data.size),
                                                 cache_dir, with_masks=True)
        return self._arrays["oracle"]

    def stage_seed(self, stage: str) -> int:
        """A seed per stage derived from the run seed, so stages do not share random streams."""
        return int(np.random.SeedSequence([self.config.seed, *map(ord, stage)]).generate_state(1)[0])

    @property
    def init_seed(self) -> int:
        """The one initialisation every from-scratch network of the run starts from.

        The papers start every network from the same ImageNet encoder; with ``weights: none`` the
        analogue is one seeded initialisation per run seed, so methods at one seed differ by their
        algorithm and data, not by the luck of their initial weights (which dominated small budgets)."""
        return self.stage_seed("init")
