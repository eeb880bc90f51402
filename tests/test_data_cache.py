"""The decoded cache: reuse, invalidation by content, concurrent builders, sizes and interpolation."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.data import cache as cache_mod
from semiseg.data.cache import callable_identity, load_arrays
from semiseg.data.types import Sample
from semiseg.errors import DataError

CALLS = {"mask": 0}


def decode_png(path: Path) -> np.ndarray:
    """Test mask decoder: the stored 8-bit values; counts its calls."""
    CALLS["mask"] += 1
    return np.asarray(Image.open(path).convert("L"))


def slow_logging_decode(path: Path) -> np.ndarray:
    """Decoder for the two-process test: logs every call (pid) to $DECODE_LOG, slowly."""
    with open(os.environ["DECODE_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.02)
    return np.asarray(Image.open(path).convert("L"))


def _write(root: Path, n: int = 6, seed: int = 0) -> list[Sample]:
    """n image/mask pairs of different sizes; masks hold 0, 1, 2 and 255 in blocks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    samples = []
    for i in range(n):
        h, w = 30 + 7 * i, 50 - 3 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        mask = np.array([0, 1, 2, 255], np.uint8)[rng.integers(0, 4, (h // 3 + 1, w // 3 + 1))]
        mask = np.kron(mask, np.ones((3, 3), np.uint8))[:h, :w]
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        samples.append(Sample(f"s{i}", root / "images" / f"{i}.png", root / "masks" / f"{i}.png"))
    return samples


def test_second_call_reuses_the_entry(tmp_path: Path) -> None:
    samples = _write(tmp_path / "data")
    CALLS["mask"] = 0
    a = load_arrays(samples, decode_png, (16, 24), tmp_path / "cache")
    assert CALLS["mask"] == len(samples)
    b = load_arrays(samples, decode_png, (16, 24), tmp_path / "cache")
    assert CALLS["mask"] == len(samples), "the second call must not decode"
    assert a.path == b.path and a.images.shape == (6, 16, 24, 3) and a.masks is not None
    assert isinstance(b.images, np.memmap) and not b.images.flags.writeable
    np.testing.assert_array_equal(a.images, b.images)
    assert b.stems == [f"s{i}" for i in range(6)] and b.index("s3") == 3 and b.indices(["s5", "s0"]) == [5, 0]
    with pytest.raises(DataError, match="nope"):
        b.index("nope")
    other = load_arrays(samples, decode_png, (16, 20), tmp_path / "cache")  # another size, another entry
    assert other.path != a.path and other.images.shape == (6, 16, 20, 3)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == ["16x20", "16x24"]


def test_original_sizes_kept_and_images_resized_by_area(tmp_path: Path) -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = (255, 0, 0)
    img[:, 30:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(tmp_path / "a_m.png")
    arrays = load_arrays([Sample("a", tmp_path / "a.png", tmp_path / "a_m.png")], decode_png, (20, 30),
                         tmp_path / "cache")
    assert arrays.orig_sizes == [(40, 60)]
    assert np.all(arrays.images[0, :, :15] == (255, 0, 0)) and np.all(arrays.images[0, :, 15:] == (0, 0, 255))


def test_masks_are_resized_nearest(tmp_path: Path) -> None:
    samples = _write(tmp_path / "data")
    for size in [(16, 24), (70, 90)]:  # down and up
        arrays = load_arrays(samples, decode_png, size, tmp_path / "cache")
        assert arrays.masks is not None
        for i, s in enumerate(samples):
            m = np.asarray(Image.open(s.mask))
            out = arrays.masks[i]
            assert set(np.unique(out)) <= set(np.unique(m))  # no new values (no blending)
            # nearest with pixel-centre alignment: output (y, x) comes from source floor((y + .5)·h/H)
            # (either neighbour when that lands exactly on a pixel border, as fixed point may round)
            h, w = m.shape
            ok = np.zeros(out.shape, bool)

            def src(n_out: int, n_in: int, eps: float) -> np.ndarray:
                pos = np.floor((np.arange(n_out) + 0.5) * n_in / n_out + eps).astype(int)
                return np.clip(pos, 0, n_in - 1)

            for dy in (-1e-6, 1e-6):
                for dx in (-1e-6, 1e-6):
                    ok |= out == m[src(size[0], h, dy)][:, src(size[1], w, dx)]
            assert ok.all()
        assert arrays.orig_sizes == [np.asarray(Image.open(s.image)).shape[:2] for s in samples]


def test_changed_file_content_rebuilds_even_with_the_same_mtime(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)  # let the hash memo record these fresh files
    samples = _write(tmp_path / "data")
    first = load_arrays(samples, decode_png, (16, 24), tmp_path / "cache")
    memo = json.loads((tmp_path / "cache" / "file-hashes.json").read_text())
    assert str(samples[2].image.resolve()) in memo
    before = np.array(first.images[2])
    st = os.stat(samples[2].image)
    img = np.asarray(Image.open(samples[2].image)).copy()
    img[...] = 255 - img  # same size, different content
    Image.fromarray(img).save(samples[2].image)
    os.utime(samples[2].image, ns=(st.st_atime_ns, st.st_mtime_ns))  # restore the mtime: ctime still moves
    assert os.stat(samples[2].image).st_size == st.st_size
    CALLS["mask"] = 0
    second = load_arrays(samples, decode_png, (16, 24), tmp_path / "cache")
    assert second.path != first.path
    assert not np.array_equal(second.images[2], before)
    np.testing.assert_array_equal(second.images[0], first.images[0])
    assert CALLS["mask"] == 0, "unchanged masks are copied from the older entry, not decoded"
    np.testing.assert_array_equal(second.masks, first.masks)
    np.testing.assert_array_equal(first.images[2], before)  # the old entry is untouched


def _build_in_child(samples: list[Sample], cache: Path, barrier: mp.synchronize.Barrier, out: Path) -> None:
    barrier.wait()
    arrays = load_arrays(samples, slow_logging_decode, (16, 24), cache)
    np.save(out, np.asarray(arrays.images))
    (out.with_suffix(".path")).write_text(str(arrays.path))


def test_two_processes_building_the_same_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = _write(tmp_path / "data", n=8)
    log = tmp_path / "decode.log"
    monkeypatch.setenv("DECODE_LOG", str(log))
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    cache = tmp_path / "cache"
    procs = [ctx.Process(target=_build_in_child, args=(samples, cache, barrier, tmp_path / f"r{i}.npy"))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    calls = log.read_text().split()
    assert len(calls) == 8 and len(set(calls)) == 1, "one builder decodes, the other waits and reuses"
    np.testing.assert_array_equal(np.load(tmp_path / "r0.npy"), np.load(tmp_path / "r1.npy"))
    assert (tmp_path / "r0.path").read_text() == (tmp_path / "r1.path").read_text()
    family = tmp_path / "cache" / "16x24"
    assert [p for p in family.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    arrays = load_arrays(samples, slow_logging_decode, (16, 24), tmp_path / "cache")
    assert len(log.read_text().split()) == 8 and arrays.masks is not None


def test_without_masks_and_unlabeled_samples(tmp_path: Path) -> None:
    samples = _write(tmp_path / "data", n=3)
    images_only = load_arrays(samples, None, (8, 8), tmp_path / "cache", with_masks=False)
    assert images_only.masks is None and images_only.images.shape == (3, 8, 8, 3)
    mixed = [*samples[:2], Sample("u", samples[2].image)]
    arrays = load_arrays(mixed, decode_png, (8, 8), tmp_path / "cache")
    assert arrays.has_mask == [True, True, False] and arrays.masks is not None
    assert np.all(arrays.masks[2] == 255)
    np.testing.assert_array_equal(arrays.images, images_only.images)


def test_errors_name_the_file(tmp_path: Path) -> None:
    samples = _write(tmp_path / "data", n=2)
    bad = Sample("bad", samples[0].image, samples[1].mask)  # mask of another size
    with pytest.raises(DataError, match="1.png"):
        load_arrays([bad], decode_png, (8, 8), tmp_path / "cache")
    with pytest.raises(DataError, match="missing.png"):
        load_arrays([Sample("m", tmp_path / "missing.png")], None, (8, 8), tmp_path / "cache",
                    with_masks=False)
    with pytest.raises(DataError, match="twice"):
        load_arrays([samples[0], samples[0]], decode_png, (8, 8), tmp_path / "cache")


class Threshold:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self, path: Path) -> np.ndarray:
        return np.zeros((1, 1), np.uint8)


def test_decoder_identity_covers_parameters() -> None:
    assert callable_identity(Threshold(128)) == callable_identity(Threshold(128))
    assert callable_identity(Threshold(128)) != callable_identity(Threshold(100))

    def make(t: int):
        return lambda p: t

    assert callable_identity(make(1)) != callable_identity(make(2))
    assert "0x" not in callable_identity(decode_png)  # no memory addresses in keys


def test_decoder_identity_is_the_same_in_every_process(tmp_path: Path) -> None:
    # str hashing is randomised per process, so any set ordering would leak into the key
    code = ("from semiseg.data.cache import callable_identity\n"
            "from semiseg.data.decode import ThresholdMask, read_image\n"
            "from semiseg.data.classes import ClassTable\n"
            "def f(p, _m={'a', 'b', 'c', 'd'}):\n    return p in {'x', 'y', 'z', 'w'}\n"
            "print(callable_identity(ThresholdMask(ClassTable.binary('polyp'))),\n"
            "      callable_identity(read_image), callable_identity(f))\n")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1
