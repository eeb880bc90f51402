"""Seeded, group-aware train/val/test splits and the benchmark's fixed test splits.

Order of drawing (BENCHMARK.md): test from the pool, then val from what is left, then labeled from
what is left after that; everything remaining is unlabeled, as are the source's images without masks.
Splits fixed in advance (``source.fixed_splits``, e.g. CamVid's official val frames as test) are taken
as given and removed from the pool first, even when they cut a group (CamVid's official split shares
sequence 0016E5 between train and val); the group's other samples then stay together in the pool.
A ratio is a share of the samples still unassigned when that split is drawn; a count is a number of
samples.

Group-aware: when samples carry a ``group`` (frames of one video), whole groups are drawn. Groups are
visited in a seeded random order and a group is taken when it brings the split's size strictly closer
to its target (the smallest group when none does), so ratios are met as closely as the group
sizes allow. Samples without a group are groups of one; without any groups this is "the first k of a
seeded permutation" with k = round(target) (halves round down).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from semiseg.data.sources import read_stem_list, write_stem_list
from semiseg.data.types import DataSource, Sample
from semiseg.errors import ConfigError, DataError

SPLIT_NAMES = ("labeled", "unlabeled", "val", "test")
Amount = float | int


@dataclass
class Splits:
    """Stems per split; written as ``<name>.txt`` files (one stem per line) into a run directory."""

    labeled: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {n: list(getattr(self, n)) for n in SPLIT_NAMES}

    def write(self, directory: Path) -> Path:
        """Write the four files atomically (empty splits as empty files) and return ``directory``."""
        directory = Path(directory)
        self.check()
        for name in SPLIT_NAMES:
            write_stem_list(directory / f"{name}.txt", getattr(self, name))
        return directory

    @classmethod
    def read(cls, directory: Path, known: Iterable[str] | None = None) -> Splits:
        """Read a split directory; ``labeled.txt`` is required, a missing other file is an empty split.

        With ``known`` (all stems of the source) every listed stem must exist; splits must be disjoint.
        """
        directory = Path(directory)
        if not (directory / "labeled.txt").is_file():
            raise DataError(f"{directory}: no labeled.txt (a split folder holds labeled.txt, "
                            "unlabeled.txt, val.txt, test.txt)")
        known = list(known) if known is not None else None
        files = {n: directory / f"{n}.txt" for n in SPLIT_NAMES}
        parts = {n: read_stem_list(f, known) if f.is_file() else [] for n, f in files.items()}
        splits = cls(**parts)
        splits.check(where=str(directory))
        return splits

    def check(self, where: str = "splits") -> None:
        """DataError when a stem is in two splits."""
        seen: dict[str, str] = {}
        for name in SPLIT_NAMES:
            for s in getattr(self, name):
                if s in seen:
                    raise DataError(f"{where}: stem {s!r} is in both {seen[s]} and {name}")
                seen[s] = name


def _check_amount(name: str, amount: Amount | None, *, allow_zero: bool) -> None:
    if amount is None:
        return
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise ConfigError(f"splits.{name}: expected a ratio (0 < r <= 1) or a count (int >= 1), "
                          f"got {amount!r}")
    if isinstance(amount, int):
        if amount < (0 if allow_zero else 1):
            raise ConfigError(f"splits.{name}: a count must be >= 1, got {amount}")
    elif not (0.0 < amount <= 1.0 or (allow_zero and amount == 0.0)):
        raise ConfigError(f"splits.{name}: a ratio must satisfy 0 < r <= 1, got {amount}")


def _units(stems: Sequence[str], group_of: dict[str, str | None]) -> list[list[str]]:
    """Sorted groups of the given stems (a stem without a group is its own unit)."""
    by_key: dict[tuple[int, str], list[str]] = {}
    for s in stems:
        g = group_of[s]
        by_key.setdefault((0, g) if g is not None else (1, s), []).append(s)
    return [sorted(by_key[k]) for k in sorted(by_key)]


def _draw(name: str, pool: list[str], amount: Amount, group_of: dict[str, str | None],
          rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Draw split ``name`` from ``pool``: (chosen, rest)."""
    n = len(pool)
    if amount == 0:
        return [], pool
    if n == 0:
        raise DataError(f"splits.{name}: no samples left to draw {name} from")
    if isinstance(amount, int) and amount > n:
        raise DataError(f"splits.{name}: {amount} samples asked for but only {n} remain to draw {name} from")
    target = float(amount) if isinstance(amount, int) else amount * n
    units = _units(pool, group_of)
    order = rng.permutation(len(units))
    chosen: list[str] = []
    for u in order:
        if abs(len(chosen) + len(units[u]) - target) < abs(len(chosen) - target):
            chosen += units[u]
    if not chosen:  # every group is more than twice the target: take the smallest (first in the order)
        chosen = list(units[min(order, key=lambda u: len(units[u]))])
    taken = set(chosen)
    return sorted(chosen), [s for s in pool if s not in taken]


def make_splits(source: DataSource, *, seed: int, labeled: Amount | None, val: Amount | None,
                test: Amount | None = None, fixed: dict[str, list[str]] | None = None,
                group_aware: bool = True) -> Splits:
    """Seeded splits of ``source`` (see the module docstring for the rules).

    ``fixed`` defaults to ``source.fixed_splits``; pass ``{}`` to ignore them. The amount of a split that
    is fixed is ignored (a config's default ``test: 0.1`` does not override CamVid's official test set).
    ``labeled=1.0`` is the oracle: every remaining sample is labeled. ``val``/``test`` of 0 or None give
    an empty split. ``group_aware=False`` ignores sample groups (e.g. CamVid, whose three sequence groups
    are too coarse for a 1/8 labeled split).
    """
    fixed = dict(source.fixed_splits if fixed is None else fixed)
    amounts = {"test": test, "val": val, "labeled": labeled}
    for name, amount in amounts.items():
        _check_amount(name, amount, allow_zero=name != "labeled")
    unknown_names = sorted(set(fixed) - set(SPLIT_NAMES))
    if unknown_names:
        raise ConfigError(f"fixed splits: unknown split names {unknown_names} (use {', '.join(SPLIT_NAMES)})")
    if "labeled" not in fixed and labeled is None:
        raise ConfigError("splits.labeled: give a ratio or a count of labeled images")

    with_mask = {s.stem: s for s in source.samples}
    without_mask = {s.stem for s in source.unlabeled}
    owner: dict[str, str] = {}
    for name in SPLIT_NAMES:
        stems = fixed.get(name, [])
        bad = [s for s in stems if s not in with_mask and s not in without_mask]
        if bad:
            raise DataError(f"fixed split {name!r}: {len(bad)} stems not in source {source.name!r}: "
                            f"{bad[:5]}")
        no_mask = [s for s in stems if s in without_mask and name != "unlabeled"]
        if no_mask:
            raise DataError(f"fixed split {name!r}: {len(no_mask)} stems have no mask: {no_mask[:5]}")
        for s in stems:
            if s in owner:
                raise DataError(f"fixed splits: stem {s!r} is in both {owner[s]!r} and {name!r}")
            owner[s] = name

    group_of = {s.stem: s.group if group_aware else None for s in source.samples}
    pool = sorted(s for s in with_mask if s not in owner)

    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {}
    for name in ("test", "val", "labeled"):
        if name in fixed:
            out[name] = sorted(fixed[name])
        elif amounts[name] is None:
            out[name] = []
        else:
            out[name], pool = _draw(name, pool, amounts[name], group_of, rng)  # type: ignore[arg-type]
    if not out["labeled"]:
        raise DataError(f"splits: no labeled samples (source {source.name!r} has {len(with_mask)} "
                        "with masks)")
    out["unlabeled"] = sorted({*fixed.get("unlabeled", []), *pool, *without_mask})
    return Splits(**out)


# --- the benchmark's fixed test splits (BENCHMARK.md), committed as package data --------------------

POLYP_KVASIR_TEST_RATIO = 0.10
POLYP_CLINIC_TEST_RATIO = 0.20
POLYP_CLINIC_TEST_MIN_FRAMES = 60
CAMVID_TEST_RANGE = ("0016E5_", 7959, 8159)


def _natural(stem: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem))


def _subset(sample: Sample) -> str | None:
    return sample.subset or (sample.stem.split("/", 1)[0] if "/" in sample.stem else None)


def polyp_test_split(source: DataSource, seed: int = 0) -> list[str]:
    """The ``polyp`` protocol's test split, regenerated from the data.

    Kvasir-SEG: ``round(10% · n)`` stems, the first of ``default_rng(seed).permutation`` of the sorted
    stems. CVC-ClinicDB: whole video sequences (sample ``group``s). Sequences are ordered by their first
    frame (natural order, so the rule does not depend on how groups are named), shuffled with a fresh
    ``default_rng(seed)``, and taken in that order until they hold at least
    ``max(60, round(20% · frames))`` frames: 6 sequences, 129 frames (BENCHMARK.md asked for about 10 %; one
    sequence swung a 3-sequence subset's mean by points, see benchmarks/clinic_sequence_spread.py).
    """
    kvasir = sorted(s.stem for s in source.samples if _subset(s) == "kvasir-seg")
    clinic = [s for s in source.samples if _subset(s) == "cvc-clinicdb"]
    if not kvasir or not clinic:
        raise DataError(f"source {source.name!r}: polyp_test_split needs kvasir-seg and cvc-clinicdb samples "
                        f"(found {len(kvasir)} and {len(clinic)})")
    if any(s.group is None for s in clinic):
        raise DataError(f"source {source.name!r}: cvc-clinicdb samples need their video sequence as group")
    n_kvasir = round(POLYP_KVASIR_TEST_RATIO * len(kvasir))
    test = [kvasir[i] for i in np.random.default_rng(seed).permutation(len(kvasir))[:n_kvasir]]
    seqs: dict[str, list[str]] = {}
    for s in clinic:
        seqs.setdefault(str(s.group), []).append(s.stem)
    ordered = sorted(seqs.values(), key=lambda frames: min(_natural(f) for f in frames))
    target = max(POLYP_CLINIC_TEST_MIN_FRAMES, round(POLYP_CLINIC_TEST_RATIO * len(clinic)))
    taken = 0
    for i in np.random.default_rng(seed).permutation(len(ordered)):
        if taken >= target:
            break
        test += ordered[i]
        taken += len(ordered[i])
    return sorted(test)


def camvid_test_split(stems: Iterable[str]) -> list[str]:
    """The official CamVid val frames ``0016E5_07959`` … ``0016E5_08159`` among ``stems``."""
    prefix, lo, hi = CAMVID_TEST_RANGE
    out = []
    for s in stems:
        if s.startswith(prefix) and s[len(prefix):].isdigit() and lo <= int(s[len(prefix):]) <= hi:
            out.append(s)
    return sorted(out)


def packaged_split_path(protocol: str, name: str = "test") -> Path:
    """Path of a split file shipped with semiseg (``splits/<protocol>/<name>.txt``)."""
    path = Path(str(resources.files("semiseg") / "splits" / protocol / f"{name}.txt"))
    if not path.is_file():
        raise DataError(f"no packaged split {protocol}/{name}.txt (known: polyp/test, camvid/test)")
    return path


def packaged_split(protocol: str, name: str = "test") -> list[str]:
    """Stems of a split file shipped with semiseg (e.g. ``packaged_split("polyp")``)."""
    return read_stem_list(packaged_split_path(protocol, name))


def regenerate_fixed_splits(data_root: Path, out_dir: Path | None = None) -> dict[str, list[str]]:
    """Recompute both fixed test splits from ``data_root`` (holding kvasir-seg/, cvc-clinicdb/, camvid/);
    write them under ``out_dir/<protocol>/test.txt`` when ``out_dir`` is given. Returns protocol -> stems."""
    from semiseg.data.presets import load_source  # the presets need this module's split helpers

    data_root = Path(data_root)
    polyp = load_source("polyp", root=data_root)
    camvid = load_source("camvid", root=data_root / "camvid")
    result = {"polyp": polyp_test_split(polyp, seed=0),
              "camvid": camvid_test_split(s.stem for s in [*camvid.samples, *camvid.unlabeled])}
    if out_dir is not None:
        for protocol, stems in result.items():
            write_stem_list(Path(out_dir) / protocol / "test.txt", stems)
    return result
