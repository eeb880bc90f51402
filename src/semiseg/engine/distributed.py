"""Process-group setup for ``torchrun`` (gloo on CPU, NCCL on CUDA) and rank-aware helpers."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from semiseg.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False  # a process group exists (torchrun), even of one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Under torchrun: networks are wrapped in DDP (SyncBatchNorm with ``train.sync_bn``), also with one
        process, so that ``--nproc_per_node 1`` runs the code paths of many."""
        return self.joined or self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE, RANK and MASTER_ADDR; one process
    too); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not ("RANK" in os.environ and "MASTER_ADDR" in os.environ):
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # leave the group before the interpreter tears down: exiting with the backend's threads still running
        # can abort the process ("terminate called without an active exception"), a failed run after its work
        atexit.register(shutdown_distributed)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), joined=True)


def shutdown_distributed() -> None:
    """Destroy the process group if this process joined one (a local call: no other rank is waited for)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: PyTorch sees no CUDA GPU on this machine; use train.device=cpu "
                          "(or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={name}: semiseg runs on cpu or cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of scalar metrics over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (``flag`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)  # the number of ranks where it does not hold
    return float(t.item()) == 0.0


def broadcast_object(obj: object) -> object:
    """Rank 0's object on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
