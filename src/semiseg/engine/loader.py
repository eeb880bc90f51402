"""An endless, resumable, DDP-aware batch stream over a map-style dataset.

Each epoch's order is a pure function of (seed, epoch); a process of rank r takes its slice of every
global batch. So the stream's position is just (epoch, batch) and resuming skips indices, not data.

One DataLoader iterator serves the whole stream (every epoch, and across validation), so worker processes
start once per training stage, not once per epoch. Each item travels as ``(epoch, index)``: a worker sets its
copy of the dataset to that epoch before reading, so augmentation stays a pure function of (seed, epoch, index)
however many workers prefetch ahead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

# per-loader cap under `auto`: a segmentation batch of cached, working-size arrays is cheap to augment; more
# workers than this only add processes (and copies of the dataset's pages) without feeding the GPU faster
MAX_AUTO_WORKERS = 4


def resolve_num_workers(setting: int | Literal["auto"], device: torch.device, local_processes: int = 1) -> int:
    """``auto``: no worker process on CPU (there the workers would take cores from the training step itself:
    measured slower on the 2-core machine, README), on CUDA half of this process's share of the cores, at most
    :data:`MAX_AUTO_WORKERS` (a process has a labeled and often an unlabeled stream, each with its own workers)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, local_processes) // 2))


class _EpochItems(Dataset):
    """``dataset[(epoch, k)]``: item ``k`` of ``epoch`` (the dataset's own ``set_epoch`` where it has one)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, k = item
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[k]


class EndlessLoader:
    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool = True,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("cannot train on an empty set of images")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.pin_memory = pin_memory
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

    def _batches(self, epoch: int, start: int) -> Iterator[list[tuple[int, int]]]:
        """This rank's batches from position (epoch, start) on, forever."""
        gb, b = self.global_batch, self.batch_size
        while True:
            order = self.epoch_order(epoch)
            for i in range(start, len(order) // gb):
                yield [(epoch, k) for k in order[i * gb + self.rank * b: i * gb + (self.rank + 1) * b]]
            epoch, start = epoch + 1, 0

    def _start(self) -> None:
        epoch, start = self.epoch, self.batch
        if start >= self.batches_per_epoch():
            epoch, start = epoch + 1, 0
        # A private generator: creating a DataLoader iterator must not consume the global torch RNG,
        # or a resumed run (which creates its iterator at another step) would drift from an unbroken one.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self._iter = iter(DataLoader(_EpochItems(self.dataset), batch_sampler=self._batches(epoch, start),
                                     num_workers=self.num_workers, generator=generator,
                                     pin_memory=self.pin_memory))

    def __iter__(self) -> EndlessLoader:
        return self

    def __next__(self) -> Any:
        """The next batch; ``batch == batches_per_epoch()`` right after an epoch's last one."""
        if self._iter is None:
            self._start()
        item = next(self._iter)  # type: ignore[arg-type]
        if self.batch >= self.batches_per_epoch():
            self.epoch, self.batch = self.epoch + 1, 0
        self.batch += 1
        return item

    def close(self) -> None:
        """Stop the worker processes now (the next batch starts them again from the current position)."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)  # DataLoader's own clean-up; garbage collection calls it too
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]
        self._iter = None
