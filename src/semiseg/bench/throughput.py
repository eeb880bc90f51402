"""Training-step throughput of the engine vs a bare PyTorch loop on the same model, batch and tensors.

The model is the product's default (the pretrained Lite0 Unet); the bare loop runs in both memory layouts
(contiguous NCHW and channels-last NHWC), so the layout ``train.channels_last: auto`` picks is measured on the
device at hand, and the engine is compared with the faster one."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from semiseg.config import TrainConfig
from semiseg.data.normalization import set_channels_last
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.trainer import Trainer
from semiseg.losses import cross_entropy
from semiseg.methods.supervised import SupervisedTask
from semiseg.models.factory import ModelConfig, build_model


class InMemory(Dataset):
    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "mask": self.masks[i]}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(), 2)


def bare_loop(images: torch.Tensor, masks: torch.Tensor, steps: int, batch: int, channels_last: bool = False
              ) -> float:
    """Seconds of the plainest loop: forward, CE, backward, AdamW step."""
    model = set_channels_last(_model(0), channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n = len(images)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = [(step * batch + j) % n for j in range(batch)]
        x, y = images[idx], masks[idx]
        loss = cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def engine_loop(images: torch.Tensor, masks: torch.Tensor, steps: int, batch: int) -> float:
    """Seconds of the same work through :class:`Trainer` (no validation, one final checkpoint)."""
    loader = EndlessLoader(InMemory(images, masks), batch, seed=0, shuffle=False)
    task = SupervisedTask(_model(0), loader)
    train = TrainConfig(steps=steps, batch_size=batch, eval_every=10**9, checkpoint_every=10**9, progress=False,
                        amp="none")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(task, train, Path(tmp), device=torch.device("cpu"))
        t0 = time.perf_counter()
        trainer.fit()
        elapsed = time.perf_counter() - t0
    return elapsed


def measure(*, steps: int = 30, batch: int = 8, size: int = 128, threads: int | None = None,
            repeats: int = 2) -> dict[str, float]:
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, size, size, generator=g)  # [0, 1], as to_input makes them
    masks = torch.randint(0, 2, (64, size, size), generator=g)
    bare_loop(images, masks, 3, batch)  # warm-up (allocator, kernels)
    bare, bare_cl, engine = [], [], []
    for _ in range(repeats):  # interleaved so that machine noise hits all alike
        # steady-state rate: the difference of a 2N- and an N-step run cancels fixed costs (model build,
        # the final checkpoint write) that do not grow with training length
        for rates, cl in ((bare, False), (bare_cl, True)):
            rates.append(steps * batch / (bare_loop(images, masks, 2 * steps, batch, cl)
                                          - bare_loop(images, masks, steps, batch, cl)))
        engine.append(steps * batch / (engine_loop(images, masks, 2 * steps, batch)
                                       - engine_loop(images, masks, steps, batch)))
    b, b_cl, e = max(bare), max(bare_cl), max(engine)
    return {"bare_img_per_s": max(b, b_cl), "bare_nchw_img_per_s": b, "bare_channels_last_img_per_s": b_cl,
            "engine_img_per_s": e, "ratio": e / max(b, b_cl), "threads": torch.get_num_threads(),
            "steps": steps, "batch": batch, "size": size}


def run_throughput(*, steps: int, batch: int, size: int, threads: int | None, out: Any) -> dict[str, float]:
    r = measure(steps=steps, batch=batch, size=size, threads=threads)
    out.print("model: the default (Unet, pretrained efficientnet-lite0)")
    out.print(f"bare PyTorch loop, NCHW:          {r['bare_nchw_img_per_s']:.1f} img/s")
    out.print(f"bare PyTorch loop, channels-last: {r['bare_channels_last_img_per_s']:.1f} img/s "
              f"({r['bare_channels_last_img_per_s'] / r['bare_nchw_img_per_s']:.2f}x NCHW)")
    out.print(f"semiseg engine (train.channels_last=auto): {r['engine_img_per_s']:.1f} img/s")
    out.print(f"ratio engine/faster bare loop: {r['ratio']:.3f} (target >= 0.95; {r['threads']} threads, "
              f"batch {batch}, {size} px, {steps} steps)")
    return r
