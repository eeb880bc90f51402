"""Throughput of semiseg vs a bare PyTorch loop on the same model (the product's default, the pretrained Lite0
Unet): training steps (engine vs bare loop, same batch and tensors; the bare loop in both memory layouts, NCHW
and channels-last, so the layout ``train.channels_last: auto`` picks is measured on the device at hand) and
inference (the batched, prefetching predictor of evaluate/predict vs a plain batched loop over the same image
files: decode, resize, forward, upsample, argmax). On CUDA both sides copy each batch from host memory to the GPU,
train under the precision ``train.amp: auto`` picks there (fp16 with a gradient scaler), and every timing waits
for the GPU to finish (``torch.cuda.synchronize``)."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from semiseg.config import ModelConfig, TrainConfig
from semiseg.data.normalization import set_channels_last
from semiseg.engine.loader import EndlessLoader
from semiseg.engine.trainer import Trainer
from semiseg.losses import cross_entropy
from semiseg.methods.supervised import SupervisedTask
from semiseg.models.factory import build_model


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


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a no-op on CPU): a timing must not stop while kernels still run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(images: torch.Tensor, masks: torch.Tensor, steps: int, batch: int, channels_last: bool = False,
              device: torch.device = torch.device("cpu")) -> float:
    """Seconds of the plainest loop: copy the batch to ``device``, forward, CE, backward, AdamW step (on CUDA under
    fp16 autocast with a gradient scaler, as the engine's ``train.amp: auto``)."""
    model = set_channels_last(_model(0).to(device), channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    n = len(images)
    synchronize(device)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = [(step * batch + j) % n for j in range(batch)]
        x, y = images[idx].to(device, non_blocking=True), masks[idx].to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext():
            loss = cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    synchronize(device)
    return time.perf_counter() - t0


def engine_loop(images: torch.Tensor, masks: torch.Tensor, steps: int, batch: int,
                device: torch.device = torch.device("cpu")) -> float:
    """Seconds of the same work through :class:`Trainer` (no validation, one final checkpoint; ``train.amp:
    auto``; on CUDA its batches come in pinned memory, as the pipeline's loaders give them there)."""
    loader = EndlessLoader(InMemory(images, masks), batch, seed=0, shuffle=False, pin_memory=device.type == "cuda")
    task = SupervisedTask(_model(0), loader)
    train = TrainConfig(steps=steps, batch_size=batch, eval_every=10**9, checkpoint_every=10**9, progress=False,
                        amp="auto")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(task, train, Path(tmp), device=device)
        synchronize(device)
        t0 = time.perf_counter()
        trainer.fit()
        synchronize(device)
        elapsed = time.perf_counter() - t0
    return elapsed


def measure(*, steps: int = 30, batch: int = 8, size: int = 128, threads: int | None = None,
            repeats: int = 2, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, size, size, generator=g)  # [0, 1], as to_input makes them
    masks = torch.randint(0, 2, (64, size, size), generator=g)
    bare_loop(images, masks, 3, batch, device=device)  # warm-up (allocator, kernels, cuDNN's choices)
    bare, bare_cl, engine = [], [], []
    for _ in range(repeats):  # interleaved so that machine noise hits all alike
        # steady-state rate: the difference of a 2N- and an N-step run cancels fixed costs (model build,
        # the final checkpoint write) that do not grow with training length
        for rates, cl in ((bare, False), (bare_cl, True)):
            rates.append(steps * batch / (bare_loop(images, masks, 2 * steps, batch, cl, device)
                                          - bare_loop(images, masks, steps, batch, cl, device)))
        engine.append(steps * batch / (engine_loop(images, masks, 2 * steps, batch, device)
                                       - engine_loop(images, masks, steps, batch, device)))
    b, b_cl, e = max(bare), max(bare_cl), max(engine)
    return {"bare_img_per_s": max(b, b_cl), "bare_nchw_img_per_s": b, "bare_channels_last_img_per_s": b_cl,
            "engine_img_per_s": e, "ratio": e / max(b, b_cl), "threads": torch.get_num_threads(),
            "steps": steps, "batch": batch, "size": size, "device": str(device)}


def _image_files(folder: Path, n: int, hw: tuple[int, int]) -> list[Path]:
    """``n`` JPEG files of ``hw`` pixels (camera-like frames: decoding them is part of the work)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((hw[1], hw[0]), Image.BILINEAR)
        paths.append(folder / f"frame{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def bare_inference(model: torch.nn.Module, files: list[Path], batch: int, size: int,
                   device: torch.device = torch.device("cpu")) -> float:
    """Seconds of the plainest batched loop: decode + resize a batch, forward, upsample, argmax."""
    import numpy as np
    import torch.nn.functional as F

    from semiseg.data.cache import resize_image
    from semiseg.data.decode import read_image
    from semiseg.data.transforms import to_input

    t0 = time.perf_counter()
    for i in range(0, len(files), batch):
        images = [read_image(p) for p in files[i:i + batch]]
        x = to_input(np.stack([resize_image(im, size, size) for im in images])).to(device)
        with torch.inference_mode():
            probs = model(x).softmax(1)
            for k, im in enumerate(images):
                up = F.interpolate(probs[k:k + 1], size=im.shape[:2], mode="bilinear", align_corners=False)
                up.max(1).indices.cpu()  # the labels, on the host (max, not argmax: see Prediction.labels)
    return time.perf_counter() - t0


def engine_inference(model: torch.nn.Module, files: list[Path], batch: int, size: int,
                     device: torch.device = torch.device("cpu")) -> float:
    """Seconds of the same work through evaluate/predict's BatchPredictor with decode prefetching."""
    from semiseg.data.decode import read_image
    from semiseg.data.prefetch import prefetch
    from semiseg.evaluation.batched import BatchPredictor

    predictor = BatchPredictor(model, protocol="resize", size=size, num_classes=2, batch_size=batch, device=device)

    def load(path: Path) -> tuple[Any, Any, None]:
        image = read_image(path)
        return image, predictor.prepare(image), None

    t0 = time.perf_counter()
    for _, pred in predictor.run(prefetch(load, files, depth=2 * batch)):
        pred.labels().cpu()
    return time.perf_counter() - t0


def measure_inference(*, images: int = 32, batch: int = 8, size: int = 128, frame: tuple[int, int] = (540, 960),
                      threads: int | None = None, repeats: int = 2,
                      device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Images/s of the inference pipeline vs the bare batched loop, same model, files and batch (best of
    ``repeats``, interleaved)."""
    if threads:
        torch.set_num_threads(threads)
    model = _model(0).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        files = _image_files(Path(tmp), images, frame)
        bare_inference(model, files[:batch], batch, size, device)  # warm-up
        bare, ours = [], []
        for _ in range(repeats):
            bare.append(len(files) / bare_inference(model, files, batch, size, device))
            ours.append(len(files) / engine_inference(model, files, batch, size, device))
    b, e = max(bare), max(ours)
    return {"bare_img_per_s": b, "engine_img_per_s": e, "ratio": e / b, "threads": torch.get_num_threads(),
            "images": images, "batch": batch, "size": size, "frame": list(frame), "device": str(device)}


def run_throughput(*, steps: int, batch: int, size: int, threads: int | None, out: Any,
                   device: torch.device = torch.device("cpu"), frames: int = 32) -> dict[str, Any]:
    r = measure(steps=steps, batch=batch, size=size, threads=threads, device=device)
    out.print(f"model: the default (Unet, pretrained efficientnet-lite0), on {device}"
              f"{' (fp16 autocast + gradient scaler)' if device.type == 'cuda' else ''}")
    out.print(f"bare PyTorch loop, NCHW:          {r['bare_nchw_img_per_s']:.1f} img/s")
    out.print(f"bare PyTorch loop, channels-last: {r['bare_channels_last_img_per_s']:.1f} img/s "
              f"({r['bare_channels_last_img_per_s'] / r['bare_nchw_img_per_s']:.2f}x NCHW)")
    out.print(f"semiseg engine (train.channels_last=auto): {r['engine_img_per_s']:.1f} img/s")
    out.print(f"ratio engine/faster bare loop: {r['ratio']:.3f} (target >= 0.95; {r['threads']} threads, "
              f"batch {batch}, {size} px, {steps} steps)")
    inf = measure_inference(images=frames, batch=batch, size=size, threads=threads, device=device)
    out.print(f"inference, bare batched loop:   {inf['bare_img_per_s']:.1f} img/s")
    out.print(f"inference, semiseg (evaluate/predict): {inf['engine_img_per_s']:.1f} img/s")
    out.print(f"ratio semiseg/bare inference: {inf['ratio']:.3f} (target >= 0.9; {inf['threads']} threads, batch "
              f"{batch}, {inf['images']} JPEG frames {inf['frame'][1]}x{inf['frame'][0]} -> {size} px)")
    return {**r, "inference": inf}
