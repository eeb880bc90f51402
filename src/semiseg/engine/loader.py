"""An endless, resumable, DDP-aware batch stream over a map-style dataset.

Each epoch's order is a pure function of (seed, epoch); a process of rank r takes its slice of every
global batch. So the stream's position is just (epoch, batch) and resuming skips indices, not data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class EndlessLoader:
    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool = True,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("cannot train on an empty set of images")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.epoch, self.batch = 0, 0
        self._iter: Iterator[Any] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Dataset indices of one epoch, a multiple of the global batch (small sets are repeated)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        reps = max(1, math.ceil(self.global_batch / n))
        order = [int(i) for _ in range(reps) for i in (torch.randperm(n, generator=g) if self.shuffle
                                                       else torch.arange(n))]
        return order[: len(order) // self.global_batch * self.global_batch]

    def batches_per_epoch(self) -> int:
        """The same for every epoch: it depends only on the set size and the global batch."""
        n = len(self.dataset)  # type: ignore[arg-type]
        return max(1, n // self.global_batch)

    def _start_epoch(self) -> None:
        order = self.epoch_order(self.epoch)
        gb, b = self.global_batch, self.batch_size
        batches = [order[i * gb + self.rank * b: i * gb + (self.rank + 1) * b] for i in range(len(order) // gb)]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        # A private generator: creating a DataLoader iterator must not consume the global torch RNG,
        # or a resumed run (which creates its iterator at another step) would drift from an unbroken one.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self._iter = iter(DataLoader(self.dataset, batch_sampler=batches[self.batch:],
                                     num_workers=self.num_workers, generator=generator))

    def __iter__(self) -> EndlessLoader:
        return self

    def __next__(self) -> Any:
        """The next batch; returns (batch, epoch_finished)."""
        if self._iter is None:
            self._start_epoch()
        try:
            item = next(self._iter)  # type: ignore[arg-type]
        except StopIteration:
            self.epoch, self.batch = self.epoch + 1, 0
            self._start_epoch()
            item = next(self._iter)  # type: ignore[arg-type]
        self.batch += 1
        return item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]
        self._iter = None
