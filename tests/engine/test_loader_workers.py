"""Worker processes feed the loop without changing what it sees: the same batches as the main process (augmentation
included, across epochs), the same after a resume, one set of workers for a whole stage (validation included)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

from semiseg.config import TrainConfig
from semiseg.data.datasets import SegmentationDataset
from semiseg.data.transforms import weak_transform
from semiseg.engine.loader import MAX_AUTO_WORKERS, EndlessLoader, resolve_num_workers
from semiseg.engine.trainer import Trainer
from semiseg.methods.supervised import SupervisedTask
from tests.engine_helpers import TinyNet


def augmented(n: int = 10, size: int = 16) -> SegmentationDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = (images[..., 0] > 127).astype(np.uint8)
    return SegmentationDataset(images, masks, range(n), weak_transform((size, size)), seed=5)


def stream(loader: EndlessLoader, batches: int) -> list[torch.Tensor]:
    return [next(loader)["image"] for _ in range(batches)]


def test_workers_give_the_main_process_batches_across_epochs() -> None:
    # 10 images, batch 3: 3 batches per epoch, so 8 batches cross two epoch boundaries, where the augmentation
    # seeds change: a worker that kept epoch 0 would repeat the first epoch's crops
    plain = stream(EndlessLoader(augmented(), 3, seed=1), 8)
    workers = stream(EndlessLoader(augmented(), 3, seed=1, num_workers=2), 8)
    for a, b in zip(plain, workers, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(plain[0], plain[3])  # the epochs really differ


def test_a_resumed_loader_with_workers_continues_the_stream() -> None:
    whole = stream(EndlessLoader(augmented(), 3, seed=1), 7)
    first = EndlessLoader(augmented(), 3, seed=1, num_workers=2)
    stream(first, 3)  # exactly one epoch: the position is (0, 3), the boundary case
    state = first.state_dict()
    first.close()
    resumed = EndlessLoader(augmented(), 3, seed=1, num_workers=2)
    resumed.load_state_dict(state)
    for a, b in zip(whole[3:], stream(resumed, 4), strict=True):
        assert torch.equal(a, b)
    assert resumed.state_dict() == {"epoch": 2, "batch": 1}


class Pids(torch.utils.data.Dataset):
    """Says which process read each item."""

    def __init__(self, n: int = 8, size: int = 8) -> None:
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return {"image": self.images[k], "mask": (self.images[k, 0] > 0.5).long(), "pid": os.getpid()}


def test_one_set_of_workers_serves_a_stage_through_epochs_and_validation(tmp_path) -> None:
    loader = EndlessLoader(Pids(), 4, seed=0, num_workers=2)  # 2 batches per epoch: 12 steps = 6 epochs
    task = SupervisedTask(TinyNet(), loader)
    seen: set[int] = set()
    step = task.train_step

    def recording(batches: dict[str, Any], ctx: Any) -> dict[str, float]:
        seen.update(int(p) for p in batches["labeled"]["pid"])
        return step(batches, ctx)

    task.train_step = recording  # type: ignore[method-assign]
    validations = []
    train = TrainConfig(steps=12, batch_size=4, eval_every=3, checkpoint_every=5, progress=False, amp="none")
    Trainer(task, train, tmp_path, device=torch.device("cpu"),
            evaluate=lambda net: validations.append(1) or {"dice": 0.5}).fit()
    assert len(validations) == 4
    assert len(seen) == 2 and os.getpid() not in seen  # the same two workers, started once
    assert loader._iter is None  # and stopped with the stage


def test_auto_workers_on_cuda_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name needs no GPU
    assert resolve_num_workers("auto", cpu) == 0
    assert 1 <= resolve_num_workers("auto", cuda) <= MAX_AUTO_WORKERS
    assert resolve_num_workers("auto", cuda, local_processes=1000) == 1  # every process gets at least one
    assert resolve_num_workers(3, cpu) == 3


@pytest.mark.slow
def test_resume_with_workers_equals_an_unbroken_run(tmp_path) -> None:
    """The engine's bit-exact resume (sampler position + RNG state) holds when workers prefetch ahead."""
    torch.use_deterministic_algorithms(True)

    def trainer(folder: str) -> Trainer:
        torch.manual_seed(0)
        ds = SegmentationDataset(*_arrays(), range(12), weak_transform((16, 16)), seed=3)
        task = SupervisedTask(TinyNet(), EndlessLoader(ds, 4, seed=7, num_workers=2))
        train = TrainConfig(steps=10, batch_size=4, lr=0.05, optimizer="sgd", eval_every=4, checkpoint_every=4,
                            progress=False, amp="none", lr_scaling="none")
        return Trainer(task, train, tmp_path / folder, device=torch.device("cpu"))

    straight = trainer("a")
    straight.fit()
    broken = trainer("b")
    step, calls = broken.task.train_step, {"n": 0}

    def crash_at_step_7(batches: dict[str, Any], ctx: Any) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 7:  # the checkpoint of step 4 is on disk, workers are ahead of it
            raise KeyboardInterrupt
        return step(batches, ctx)

    broken.task.train_step = crash_at_step_7  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    for loader in broken.task.loaders.values():
        loader.close()
    resumed = trainer("b")
    resumed.fit()
    for k, v in straight.task.eval_net().state_dict().items():
        assert torch.equal(v, resumed.task.eval_net().state_dict()[k]), k


def _arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    return images, (images[..., 1] > 100).astype(np.uint8)
