"""One training epoch of data loading: decoding JPEGs every time vs reading the warm decoded cache.

    python benchmarks/cache_epoch.py --data ../shared/data/kvasir-seg --size 128

Both paths produce the same items (weak transform + ImageNet normalisation to tensors, seeded per
index) in the main process, single-threaded (``--threads``), so the ratio is the work the cache saves.
The cache is built (untimed) before the cached epoch if it is not there yet.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from semiseg.data.cache import load_arrays, resize_image, resize_mask
from semiseg.data.datasets import SegmentationDataset
from semiseg.data.decode import read_image
from semiseg.data.transforms import to_input, weak_transform
from semiseg.data.types import DataSource


def load(data: Path) -> DataSource:
    try:
        from semiseg.data.presets import load_source
    except ImportError:
        from semiseg.data.sources import folder_source

        return folder_source(data, mask_format="threshold")
    return load_source("kvasir-seg", root=data)


def decode_epoch(source: DataSource, size: tuple[int, int], seed: int) -> float:
    """(a) what a loader without the cache does per item: decode, resize, augment, normalise."""
    transform = weak_transform(size)
    start = time.perf_counter()
    for k, s in enumerate(source.samples):
        image = resize_image(read_image(s.image), *size)
        mask = resize_mask(source.decode_mask(s.mask), *size)  # type: ignore[arg-type]
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0, k]).spawn(2)[0])
        image, mask = transform(image, mask, rng)
        to_input(image), torch.from_numpy(np.ascontiguousarray(mask)).long()
    return time.perf_counter() - start


def cached_epoch(source: DataSource, size: tuple[int, int], seed: int, cache_dir: Path | None) -> float:
    """(b) the same items from the warm cache through SegmentationDataset."""
    arrays = load_arrays(source.samples, source.decode_mask, size, cache_dir)
    dataset = SegmentationDataset(arrays.images, arrays.masks, range(len(arrays)), weak_transform(size),
                                  seed=seed)
    start = time.perf_counter()
    for k in range(len(dataset)):
        dataset[k]
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of a Kvasir-SEG copy (images/, masks/)")
    ap.add_argument("--size", type=int, default=128, help="square working size")
    ap.add_argument("--cache", type=Path, default=None, help="cache dir (default $SEMISEG_CACHE or ~/.cache)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    source = load(args.data)
    size = (args.size, args.size)
    t0 = time.perf_counter()
    load_arrays(source.samples, source.decode_mask, size, args.cache)  # build or open (untimed below)
    ready = time.perf_counter() - t0
    print(f"cache ready in {ready:.2f} s ({len(source.samples)} samples, {size[0]}x{size[1]})")
    cached = cached_epoch(source, size, args.seed, args.cache)
    decoded = decode_epoch(source, size, args.seed)
    n = len(source.samples)
    print(f"(a) decode every time: {decoded:.2f} s  ({n / decoded:.0f} img/s)")
    print(f"(b) warm cache:        {cached:.2f} s  ({n / cached:.0f} img/s)")
    print(f"speed-up: {decoded / cached:.1f}x")


if __name__ == "__main__":
    main()
