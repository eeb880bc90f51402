"""The class values present in every mask of a folder, read once and remembered by file content.

A folder given without a class table gets its table from the values its masks hold. Reading *every*
mask (not a sample of them) is what makes ``semiseg data inspect`` and ``train`` agree, and what finds a
stray value before training instead of at the final test. The values of each mask are memoised in the
decoded cache folder (``mask-values.json``, keyed by the file's content digest), so later runs read
only masks that changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from semiseg.atomic import atomic_write_bytes
from semiseg.data.cache import CACHE_FILE_MODE, _HashMemo, default_cache_dir
from semiseg.data.classes import IGNORE_INDEX, ClassTable
from semiseg.data.decode import IndexMask
from semiseg.errors import OutputError
from semiseg.progress import phase

_MEMO_NAME = "mask-values.json"
_PROBE = IndexMask(ClassTable(tuple(f"class_{i}" for i in range(255))))  # raw indices, 255 = void


def mask_values(paths: Sequence[Path], cache_dir: Path | None = None) -> list[frozenset[int]]:
    """The set of raw index values (255 included) of every mask in ``paths``, in order."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    usable = cache_dir.is_dir() or _try_mkdir(cache_dir)
    hashes = _HashMemo(cache_dir / "file-hashes.json", enabled=usable)
    memo_path = cache_dir / _MEMO_NAME
    memo: dict[str, list[int]] = {}
    if usable:
        try:
            loaded = json.loads(memo_path.read_text(encoding="utf-8"))
            memo = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            memo = {}

    def values(path: Path) -> tuple[str, frozenset[int]]:
        digest = hashes.digest(path)
        if isinstance(memo.get(digest), list):
            return digest, frozenset(int(v) for v in memo[digest])
        m = _PROBE(path)
        return digest, frozenset(int(v) for v in np.flatnonzero(np.bincount(m.ravel(), minlength=256)))

    found: list[tuple[str, frozenset[int]]] = []
    where = f"{paths[0].parent}: reading every mask for the class table" if paths else ""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex, phase(where, len(paths)) as update:
        for item in ex.map(values, paths):
            found.append(item)
            update(len(found), len(paths))
    hashes.save()
    fresh = {d: sorted(v) for d, v in found if d not in memo}
    if usable and fresh:
        try:
            atomic_write_bytes(memo_path, json.dumps({**memo, **fresh}).encode(), mode=CACHE_FILE_MODE)
        except (OSError, OutputError):
            pass  # an optimisation only: a read-only cache folder reads the masks again next time
    return [v for _, v in found]


def _try_mkdir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return True
    except OSError:
        return False


def table_from_values(folder: Path, paths: Sequence[Path], values: Sequence[frozenset[int]]) -> ClassTable | str:
    """The class table the values imply, or a message naming the files when they look wrong.

    Values within {0, 1} -> binary ``background/object``; ``0..K`` without gaps -> ``class_0 .. class_K``.
    A gap (values 0, 1 and 7, say) means a stray value far more often than a class that never occurs:
    that is reported with the files holding the values above the gap.
    """
    found = set().union(*values) - {IGNORE_INDEX} if values else set()
    top = max(found, default=0)
    if top <= 1:
        return ClassTable.binary("object")
    missing = sorted(set(range(top + 1)) - found)
    if not missing:
        return ClassTable(tuple(f"class_{i}" for i in range(top + 1)))
    above = sorted(v for v in found if v > missing[0])
    files = [p.name for p, v in zip(paths, values, strict=True) if v & set(above)]
    shown = ", ".join(files[:5]) + (f", ... ({len(files)} files)" if len(files) > 5 else "")
    gap = f"{missing[0]}" if len(missing) == 1 else f"{missing[0]}..{missing[-1]}" if \
        missing == list(range(missing[0], missing[-1] + 1)) else ", ".join(map(str, missing[:8]))
    return (f"{folder}: the masks hold values {', '.join(map(str, sorted(found)))} but {gap} in none, so "
            f"{', '.join(map(str, above))} look stray: in {shown}. Fix those masks, or name every class with "
            f"data.options.classes=[name0, name1, ...] ({top + 1} names for values 0..{top})")


def mixed_binary_encodings(folder: Path, fmt: str, paths: Sequence[Path],
                           values: Sequence[frozenset[int]]) -> str | None:
    """A message when black/white masks (only 0 and 255) sit among 0/1 masks, else None. Read with one rule
    (``fmt``, decided from the first mask), one kind would silently lose its objects: as class indices 255 is
    void, and thresholded at 128 a 1 is background."""
    black_white = [p.name for p, v in zip(paths, values, strict=True) if v == {0, IGNORE_INDEX}]
    zero_one = [p.name for p, v in zip(paths, values, strict=True) if 1 in v and v <= {0, 1, IGNORE_INDEX}]
    if not black_white or not zero_one:
        return None
    lost = black_white if fmt == "index" else zero_one
    how = "their 255 (object) pixels become void" if fmt == "index" else "their 1 (object) pixels become background"
    shown = ", ".join(lost[:3]) + (f", ... ({len(lost)} in all)" if len(lost) > 3 else "")
    return (f"{folder}: {len(zero_one)} masks hold 0/1 and {len(black_white)} hold 0/255; read as {fmt} masks (decided "
            f"from {paths[0].name}) {how} in {shown}. Save every mask the same way, or set "
            "data.options.mask_format=index if 255 marks void pixels there")
