"""Training-step time of the default model in one memory layout (for a paired whole-process comparison).

    python benchmarks/layout_step.py nchw|channels-last [--threads 1] [--steps 20] [--size 128] [--batch 8]

Builds the default model (Unet, pretrained EfficientNet-Lite0), runs 3 warm-up steps and STEPS timed
fwd + bwd + AdamW steps on fixed random tensors, and prints images/s. Run it twice, once per layout, paired.
"""

from __future__ import annotations

import argparse
import time

import torch

from semiseg.config import ModelConfig
from semiseg.data.normalization import set_channels_last
from semiseg.losses import cross_entropy
from semiseg.models.factory import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("layout", choices=["nchw", "channels-last"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = set_channels_last(build_model(ModelConfig(), 2), args.layout == "channels-last").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 2, (args.batch, args.size, args.size))
    for step in range(3 + args.steps):
        if step == 3:
            t0 = time.perf_counter()
        loss = cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"{args.layout}: {args.steps * args.batch / (time.perf_counter() - t0):.1f} img/s")


if __name__ == "__main__":
    main()
