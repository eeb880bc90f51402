"""Tiny tasks for engine tests: an in-memory dataset and a BatchNorm-free net (DDP can equal one process)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from semiseg.bench.throughput import InMemory
from semiseg.config import TrainConfig
from semiseg.engine.distributed import init_distributed
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.trainer import Trainer
from semiseg.methods.supervised import SupervisedTask


class TinyNet(nn.Module):
    """encoder / decoder / classifier named like an smp model, no BatchNorm."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        # dropout exercises the RNG restore on resume; DDP tests turn it off (ranks draw their own masks)
        self.decoder = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(dropout))
        self.segmentation_head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))


def data(n: int = 24, size: int = 16) -> InMemory:
    g = torch.Generator().manual_seed(123)
    images = torch.randn(n, 3, size, size, generator=g)
    masks = (images[:, 0] > 0).long()
    masks[:, :2] = 255  # some ignored pixels
    return InMemory(images, masks)


def make_trainer(stage_dir: Path, *, steps: int, batch: int, rank: int = 0, world: int = 1, dist=None,
                 checkpoint_every: int = 5, evaluate=None, dropout: float = 0.2) -> Trainer:
    torch.manual_seed(0)
    net = TinyNet(dropout)
    loader = EndlessLoader(data(), batch, seed=7, rank=rank, world_size=world)
    train = TrainConfig(steps=steps, batch_size=batch, lr=0.05, optimizer="sgd", eval_every=4,
                        checkpoint_every=checkpoint_every, progress=False, amp="none", lr_scaling="none",
                        head_lr_mult=10.0)
    return Trainer(SupervisedTask(net, loader), train, stage_dir, device=torch.device("cpu"), dist=dist,
                   evaluate=evaluate)


def ddp_main(out: str, steps: int, batch: int) -> None:
    """Entry point under torchrun: train, rank 0 saves the final weights."""
    torch.use_deterministic_algorithms(True)
    dist = init_distributed(torch.device("cpu"))
    trainer = make_trainer(Path(out), steps=steps, batch=batch, rank=dist.rank, world=dist.world_size, dist=dist,
                           dropout=0.0)
    trainer.fit()
    if dist.is_main:
        torch.save(trainer.task.eval_net().state_dict(), Path(out) / "final.pt")


if __name__ == "__main__":
    ddp_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
