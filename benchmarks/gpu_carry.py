"""What `benchmarks/gpu_check.sh` needs on a GPU machine that reaches no network, in one folder of at most ~40 MB:
the polyp data of the benchmark protocol, reduced to fit the size limit on what travels there.

The fixed test split keeps its original files (test is scored at native resolution). Every other image (labeled,
unlabeled, validation) is only ever used at the working size, so it is stored resized to it by semiseg's own
resize (area down-sampling, as the decoded cache does): images as JPEG quality 95 (the one change: re-encoding
noise of about one grey level), masks as lossless PNG of the decoded classes (0/255, what the threshold decoder
reads back exactly). Stems and folders are the preset's, so `--set data.root=CARRY/polyp` runs the protocol as is.

    python benchmarks/gpu_carry.py --data /path/to/datasets --out .gpu-carry/polyp
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from semiseg.data.cache import resize_image, resize_mask
from semiseg.data.decode import read_image
from semiseg.data.presets import load_source


def reduce_polyp(data: Path, out: Path, size: tuple[int, int]) -> dict[str, int]:
    source = load_source("polyp", data / "")
    test = set(source.fixed_splits["test"])
    counts = {"original": 0, "reduced": 0}
    for sample in source.samples:
        part, name = sample.stem.split("/", 1)
        images, masks = out / part / "images", out / part / "masks"
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        if sample.stem in test:
            shutil.copy2(sample.image, images / sample.image.name)
            shutil.copy2(sample.mask, masks / sample.mask.name)  # type: ignore[arg-type]
            counts["original"] += 1
            continue
        image = resize_image(read_image(sample.image), *size)
        Image.fromarray(image).save(images / f"{name}.jpg", quality=95)
        classes = resize_mask(source.decode_mask(sample.mask), *size)  # type: ignore[arg-type]
        Image.fromarray(np.where(classes == 1, 255, 0).astype(np.uint8)).save(masks / f"{name}.png")
        counts["reduced"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding kvasir-seg/ and cvc-clinicdb/")
    parser.add_argument("--out", type=Path, required=True, help="new folder for the reduced polyp data")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), help="working size H W of the protocol")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    counts = reduce_polyp(args.data, args.out, tuple(args.size))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {counts['original']} test pairs as they are, {counts['reduced']} reduced to "
          f"{args.size[0]}x{args.size[1]}; {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
