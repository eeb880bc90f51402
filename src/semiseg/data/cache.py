"""The decoded cache: decode + resize every image and mask once, then memmap them in every later run.

Layout: ``<cache_dir>/<H>x<W>/<key>/{images.npy, masks.npy, meta.json}``. The ``key`` hashes the cache
version, the working size, the identity of the image reader and mask decoder (their code and
parameters, see :func:`callable_identity`), and for every sample its stem and the blake2b digests of
its image and mask *bytes*. A changed file therefore gives a new key and a rebuild (rows whose files did
not change are copied from the older entry of the same size instead of being decoded again).

Entries are immutable once published. A builder takes an exclusive ``fcntl`` lock on
``<key>.lock``, writes into a temporary directory, fsyncs, and ``os.replace``s it into place; a second
process asking for the same entry blocks on the lock and then opens what the first one built. Readers
of a published entry need no lock. Entries are never deleted automatically (remove the directory).

Hash memo (``file-hashes.json``): re-hashing is skipped for a file only when its device, inode, size,
mtime *and ctime* all equal the memo's record, and a record is only written for a file whose mtime and
ctime were already ``SETTLE_NS`` (2 s) old when it was hashed. ctime cannot be set from user space and
changes on every write, so restoring an mtime (``touch -d``, ``cp -p``, ``rsync -t``) does not fool the
memo, and the settle rule covers writes within one timestamp tick (git's "racy clean" problem).
``verify=True`` or ``SEMISEG_CACHE_VERIFY=1`` hashes every file regardless.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from semiseg.atomic import atomic_write_bytes, publish_directory
from semiseg.data.decode import read_image
from semiseg.data.types import MaskDecoder, Sample
from semiseg.errors import DataError, OutputError

CACHE_VERSION = 1
SETTLE_NS = 2_000_000_000
_MEMO_NAME = "file-hashes.json"

CACHE_FILE_MODE = 0o644  # atomic writes make 0600 files; a cache shared between users must be readable


def default_cache_dir() -> Path:
    """``$SEMISEG_CACHE`` or ``~/.cache/semiseg``."""
    env = os.environ.get("SEMISEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "semiseg"


@dataclass
class CachedArrays:
    """Decoded, resized arrays of a sample list, in the order the samples were given.

    ``images`` N×H×W×3 and ``masks`` N×H×W are read-only uint8 memmaps (``masks`` is None when loaded
    without masks; a sample without a mask file has an all-255 row and ``has_mask`` False).
    ``orig_sizes`` are the files' (H, W), to map predictions back to full resolution.
    """

    images: np.ndarray
    masks: np.ndarray | None
    stems: list[str]
    orig_sizes: list[tuple[int, int]]
    has_mask: list[bool]
    path: Path
    _pos: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pos = {s: i for i, s in enumerate(self.stems)}

    def __len__(self) -> int:
        return len(self.stems)

    def index(self, stem: str) -> int:
        """Row of ``stem``; a DataError names a stem that is not in the arrays."""
        try:
            return self._pos[stem]
        except KeyError:
            raise DataError(f"stem {stem!r} is not among the {len(self.stems)} cached samples") from None

    def indices(self, stems: Sequence[str]) -> list[int]:
        return [self.index(s) for s in stems]


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _code_digest(code: Any) -> str:
    # constants via _stable: a set literal compiles to a frozenset whose repr order changes per process
    consts = [_code_digest(c) if inspect.iscode(c) else _stable(c) for c in code.co_consts]
    return _digest(code.co_code + repr(consts).encode())


def _stable(obj: Any, depth: int = 0) -> str:
    """A repr without memory addresses, for cache keys."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    if depth > 8:
        return type(obj).__qualname__
    if isinstance(obj, (bytes, bytearray)):
        return f"bytes:{_digest(bytes(obj))}"
    if isinstance(obj, Path):
        return f"Path({str(obj)!r})"
    if isinstance(obj, np.ndarray):
        return f"array{obj.shape}{obj.dtype}:{_digest(np.ascontiguousarray(obj).tobytes())}"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(_stable(x, depth + 1) for x in obj) + "]"
    if isinstance(obj, (set, frozenset)):
        return "{" + ", ".join(sorted(_stable(x, depth + 1) for x in obj)) + "}"
    if isinstance(obj, dict):
        items = sorted((_stable(k, depth + 1), _stable(v, depth + 1)) for k, v in obj.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return f"{type(obj).__qualname__}({_stable(fields, depth + 1)})"
    if callable(obj):
        return callable_identity(obj, depth + 1)
    if hasattr(obj, "__dict__"):
        return f"{type(obj).__qualname__}({_stable(vars(obj), depth + 1)})"
    return type(obj).__qualname__


def callable_identity(fn: Callable[..., Any], depth: int = 0) -> str:
    """Identity of a reader/decoder for cache keys: a ``cache_key`` attribute when it has one, else its
    qualified name, code digest, defaults, closure values and (for objects) attributes."""
    key = getattr(fn, "cache_key", None)
    if isinstance(key, str):
        return key
    if isinstance(fn, functools.partial):
        return f"partial({callable_identity(fn.func, depth + 1)}, {_stable(fn.args, depth + 1)}, " \
               f"{_stable(fn.keywords, depth + 1)})"
    if inspect.ismethod(fn):
        return f"{callable_identity(fn.__func__, depth + 1)}@{_stable(fn.__self__, depth + 1)}"
    if inspect.isfunction(fn):
        cells = [c.cell_contents for c in fn.__closure__ or ()]
        extra = _stable([fn.__defaults__, fn.__kwdefaults__, cells], depth + 1)
        return f"{fn.__module__}.{fn.__qualname__}:{_code_digest(fn.__code__)}:{extra}"
    cls = type(fn)
    call = getattr(cls.__call__, "__code__", None)
    state = _stable(vars(fn), depth + 1) if hasattr(fn, "__dict__") else ""
    return f"{cls.__module__}.{cls.__qualname__}:{_code_digest(call) if call else ''}:{state}"


class _HashMemo:
    """File digests remembered by (dev, ino, size, mtime_ns, ctime_ns); see the module docstring."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled, self.dirty = path, enabled, False
        self.data: dict[str, list[Any]] = {}
        if enabled:
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                self.data = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.data = {}

    def digest(self, path: Path) -> str:
        try:
            st = os.stat(path)
            sig = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            name = str(path.resolve())
            rec = self.data.get(name)
            if self.enabled and isinstance(rec, list) and rec[:5] == sig:
                return str(rec[5])
            now = time.time_ns()
            with open(path, "rb") as f:
                d = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
        except OSError as e:
            raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e
        if self.enabled and now - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLE_NS:
            self.data[name] = [*sig, d]
            self.dirty = True
        return d

    def save(self) -> None:
        if self.enabled and self.dirty:
            try:
                atomic_write_bytes(self.path, json.dumps(self.data).encode(), mode=CACHE_FILE_MODE)
            except (OSError, OutputError):
                pass  # the memo is an optimisation; a read-only cache dir just re-hashes next time



def resize_image(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Image to (h, w): area interpolation when shrinking both sides, bilinear otherwise."""
    ih, iw = img.shape[:2]
    if (ih, iw) == (h, w):
        return img
    interp = cv2.INTER_AREA if ih >= h and iw >= w else cv2.INTER_LINEAR
    return cv2.resize(img, (w, h), interpolation=interp)


def resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Mask to (h, w) by nearest neighbour, pixel-centre aligned like :func:`resize_image`."""
    if mask.shape == (h, w):
        return mask
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


def _open_entry(entry: Path, key: str, n: int, size: tuple[int, int],
                with_masks: bool) -> CachedArrays | None:
    """The published entry at ``entry``, or None when it is absent or not the expected one."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key or len(meta["stems"]) != n:
            return None
        images = np.load(entry / "images.npy", mmap_mode="r")
        masks = np.load(entry / "masks.npy", mmap_mode="r") if with_masks else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if images.shape != (n, *size, 3) or images.dtype != np.uint8:
        return None
    if masks is not None and (masks.shape != (n, *size) or masks.dtype != np.uint8):
        return None
    return CachedArrays(images, masks, list(meta["stems"]), [tuple(s) for s in meta["orig_sizes"]],
                        list(meta["has_mask"]), entry)


def _donors(family: Path, reader: str, decoder: str | None, limit: int = 8) -> list[tuple[dict, Path]]:
    """Metadata of the most recent entries of the same size, reader and decoder, to copy rows from."""
    metas = []
    for m in family.glob("*/meta.json"):
        try:
            metas.append((m.stat().st_mtime_ns, m))
        except OSError:
            continue
    out = []
    for _, m in sorted(metas, reverse=True):
        try:
            meta = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("version") == CACHE_VERSION and meta.get("reader") == reader:
            out.append((meta, m.parent))
        if len(out) >= limit:
            break
    return out


class _RowSource:
    """Rows of older entries indexed by file digest, so a rebuild only decodes changed files."""

    def __init__(self, donors: list[tuple[dict, Path]], decoder: str | None):
        self.images: dict[str, tuple[np.ndarray, int, tuple[int, int]]] = {}
        self.masks: dict[str, tuple[np.ndarray, int]] = {}
        for meta, entry in donors:
            try:
                imgs = np.load(entry / "images.npy", mmap_mode="r")
                msks = np.load(entry / "masks.npy", mmap_mode="r") if meta.get("decoder") else None
            except (OSError, ValueError):
                continue
            for i, d in enumerate(meta.get("image_digests", [])):
                self.images.setdefault(d, (imgs, i, tuple(meta["orig_sizes"][i])))
            if msks is not None and meta.get("decoder") == decoder:
                for i, d in enumerate(meta.get("mask_digests", [])):
                    if d is not None:
                        self.masks.setdefault(d, (msks, i))


def _build(entry: Path, key: str, samples: Sequence[Sample], digests: list[tuple[str, str | None]],
           decode_mask: MaskDecoder | None, size: tuple[int, int], ids: tuple[str, str | None],
           workers: int, progress: Callable[[int, int], None] | None) -> None:
    h, w = size
    n = len(samples)
    family = entry.parent
    # an existing entry (broken or foreign) is moved aside: open memmaps of it stay valid
    with publish_directory(entry, mode=0o755) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
        masks = None
        if decode_mask is not None:
            masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, h, w))
        rows = _RowSource(_donors(family, ids[0], ids[1]), ids[1])

        def work(i: int) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
            s, (dimg, dmask) = samples[i], digests[i]
            reused = rows.images.get(dimg)
            if reused is not None:
                img, orig = np.asarray(reused[0][reused[1]]), reused[2]
            else:
                full = read_image(s.image)
                orig = (int(full.shape[0]), int(full.shape[1]))
                img = resize_image(full, h, w)
            if decode_mask is None:
                return img, None, orig
            if s.mask is None:
                return img, np.full((h, w), 255, np.uint8), orig
            if dmask in rows.masks:
                arr, row = rows.masks[dmask]
                return img, np.asarray(arr[row]), orig
            m = decode_mask(s.mask)
            if not isinstance(m, np.ndarray) or m.dtype != np.uint8 or m.ndim != 2:
                raise DataError(f"{s.mask}: mask decoder returned {getattr(m, 'dtype', type(m))} "
                                f"{getattr(m, 'shape', '')}, expected uint8 H×W")
            if m.shape != orig:
                raise DataError(f"{s.mask}: mask is {m.shape[0]}x{m.shape[1]} but its image {s.image} is "
                                f"{orig[0]}x{orig[1]}")
            return img, resize_mask(m, h, w), orig

        orig_sizes: list[list[int]] = []
        with ThreadPoolExecutor(max_workers=workers) as ex:
            for i, (img, m, orig) in enumerate(ex.map(work, range(n))):
                images[i] = img
                if masks is not None:
                    masks[i] = m
                orig_sizes.append(list(orig))
                if progress is not None:
                    progress(i + 1, n)
        for arr, name in ((images, "images.npy"), (masks, "masks.npy")):
            if arr is not None:
                arr.flush()
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
        del images, masks
        meta = {"version": CACHE_VERSION, "key": key, "size": [h, w], "reader": ids[0], "decoder": ids[1],
                "stems": [s.stem for s in samples], "orig_sizes": orig_sizes,
                "has_mask": [decode_mask is not None and s.mask is not None for s in samples],
                "image_digests": [d[0] for d in digests], "mask_digests": [d[1] for d in digests],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_bytes(tmp / "meta.json", json.dumps(meta).encode(), mode=CACHE_FILE_MODE)


def file_digests(samples: Sequence[Sample], *, with_masks: bool = True, cache_dir: Path | None = None,
                 workers: int | None = None, verify: bool = False) -> list[tuple[str, str | None]]:
    """Content digests ``(image, mask or None)`` of every sample: the cache's per-file keys (memoised, see
    the module docstring). Run directories record them to notice data that changed under a run."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    verify = verify or os.environ.get("SEMISEG_CACHE_VERIFY", "") not in ("", "0")
    memo = _HashMemo(cache_dir / _MEMO_NAME, enabled=not verify and cache_dir.is_dir())

    def digest_pair(s: Sample) -> tuple[str, str | None]:
        mask = memo.digest(s.mask) if with_masks and s.mask is not None else None
        return memo.digest(s.image), mask

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as ex:
        digests = list(ex.map(digest_pair, samples))
    memo.save()
    return digests


def load_arrays(samples: Sequence[Sample], decode_mask: MaskDecoder | None, size: tuple[int, int],
                cache_dir: Path | None = None, *, with_masks: bool = True,
                progress: Callable[[int, int], None] | None = None, workers: int | None = None,
                verify: bool = False) -> CachedArrays:
    """Decoded ``samples`` at working ``size`` (H, W), from the cache or built into it.

    Load a whole source once and index it with split stems (``CachedArrays.index``): an entry is keyed
    by the exact sample list, so subsets would each get their own copy. ``progress(done, total)`` is
    called while decoding. Images are resized with area (down) / bilinear (up) interpolation, masks
    with nearest (``INTER_NEAREST_EXACT``, pixel-centre aligned like the image).
    """
    if not samples:
        raise DataError("no samples to load")
    h, w = (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise DataError(f"working size must be positive, got {size!r}")
    if with_masks and decode_mask is None:
        raise ValueError("load_arrays(with_masks=True) needs a mask decoder")
    stems = [s.stem for s in samples]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[:5]
        raise DataError(f"stems listed twice in the samples to cache: {dup}")
    decoder = decode_mask if with_masks else None
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    family = cache_dir / f"{h}x{w}"
    try:
        family.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{cache_dir}: cannot create the decoded cache here ({e.strerror}); "
                        "set SEMISEG_CACHE to a writable folder") from e
    workers = workers or min(4, os.cpu_count() or 1)
    digests = file_digests(samples, with_masks=decoder is not None, cache_dir=cache_dir, workers=workers,
                           verify=verify)
    ids = (callable_identity(read_image), callable_identity(decoder) if decoder is not None else None)
    key = _digest(json.dumps({"version": CACHE_VERSION, "size": [h, w], "reader": ids[0], "decoder": ids[1],
                              "items": [[s, *d] for s, d in zip(stems, digests, strict=True)]}).encode())
    entry = family / key
    found = _open_entry(entry, key, len(samples), (h, w), decoder is not None)
    if found is not None:
        return found
    with open(family / f"{key}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            found = _open_entry(entry, key, len(samples), (h, w), decoder is not None)
            if found is None:
                _build(entry, key, samples, digests, decoder, (h, w), ids, workers, progress)
                found = _open_entry(entry, key, len(samples), (h, w), decoder is not None)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    if found is None:
        raise DataError(f"{entry}: the decoded cache entry could not be read back after building it")
    return found
