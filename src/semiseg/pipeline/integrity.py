"""A run's fingerprint: the resolved config and the content of every file of its splits, recorded when the
run is made (``fingerprint.json``) and compared by ``resume`` and ``evaluate``.

A run directory is only meaningful together with the config and data it was made from: resuming after
``config.yaml`` was edited would train new stages on top of old ones, and a changed mask would silently
mix two datasets. File contents are the decoded cache's per-file digests (memoised, so checking is cheap).
Keys that only say *how* to run (device, threads, progress bar, data location) may change freely.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from semiseg.atomic import atomic_write_text
from semiseg.config import RunConfig
from semiseg.data.cache import file_digests
from semiseg.data.splits import SPLIT_NAMES, Splits
from semiseg.data.types import DataSource
from semiseg.errors import RunChangedError

FINGERPRINT = "fingerprint.json"
VERSION = 1
# keys that change how a run executes, not what it computes
RUNTIME_KEYS = frozenset({"train.device", "train.threads", "train.progress", "train.num_workers",
                          "train.tensorboard", "data.root", "data.cache_dir"})
# where a folder dataset lives: it may move; the content digests judge whether it is the same data
LOCATION_KEYS = frozenset({"data.options.unlabeled", "split.files"})


def _is_location(key: str, old: Any, new: Any) -> bool:
    from semiseg.data.presets import PRESETS

    if key in RUNTIME_KEYS or key in LOCATION_KEYS:
        return True
    # data.source as a folder path (not a preset name) is a location too
    return key == "data.source" and old not in PRESETS and new not in PRESETS


def _cache_dir(config: RunConfig) -> Path | None:
    return Path(config.data.cache_dir) if config.data.cache_dir else None


def split_digests(config: RunConfig, source: DataSource, splits: Splits,
                  names: Iterable[str] = SPLIT_NAMES) -> dict[str, dict[str, list[str | None] | None]]:
    """``{split: {stem: [image digest, mask digest] or None when the stem is no longer in the data}}``."""
    by_stem = source.by_stem()
    out: dict[str, dict[str, list[str | None] | None]] = {}
    for name in names:
        stems = getattr(splits, name)
        present = [by_stem[s] for s in stems if s in by_stem]
        # unlabeled masks matter where they are read: the oracle trains on them, benchmark mode scores with them
        with_masks = name != "unlabeled" or config.data.benchmark_gt or config.method.name == "oracle"
        digests = file_digests(present, with_masks=with_masks, cache_dir=_cache_dir(config))
        found = {s.stem: list(d) for s, d in zip(present, digests, strict=True)}
        out[name] = {s: found.get(s) for s in stems}
    return out


def make_fingerprint(config: RunConfig, source: DataSource, splits: Splits) -> dict[str, Any]:
    return {"version": VERSION, "config": config.model_dump(mode="json"), "classes": list(source.classes.names),
            "data": split_digests(config, source, splits)}


def write_fingerprint(directory: Path, fingerprint: dict[str, Any]) -> None:
    atomic_write_text(directory / FINGERPRINT, json.dumps(fingerprint))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def config_changes(recorded: dict[str, Any], current: RunConfig) -> list[str]:
    """``key: old -> new`` for every key that changed (runtime and location keys excepted; keys the record lacks
    are :func:`new_options`)."""
    old, new = _flat(recorded), _flat(current.model_dump(mode="json"))
    keys = sorted(k for k in old if old.get(k) != new.get(k) and not _is_location(k, old.get(k), new.get(k)))
    if old.get("method.name") != new.get("method.name"):  # another method: its options differ wholesale
        keys = [k for k in keys if not k.startswith("method.") or k == "method.name"]
    return [f"{k}: {old.get(k)!r} -> {new.get(k, '(gone)')!r}" for k in keys]


def new_options(recorded: dict[str, Any], current: RunConfig) -> list[str]:
    """``key = default`` for options a newer semiseg added since the run was made (their defaults could change
    what an unfinished stage does)."""
    old, new = _flat(recorded), _flat(current.model_dump(mode="json"))
    if old.get("method.name") != new.get("method.name"):
        return []
    return [f"{k} = {new[k]!r}" for k in sorted(new) if k not in old and not _is_location(k, None, new[k])]


def _show(stems: list[str], limit: int = 3) -> str:
    return ", ".join(stems[:limit]) + (f", ... ({len(stems)} in all)" if len(stems) > limit else "")


def data_changes(recorded: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(changes that make the run unusable: files gone, split lists edited; changed file contents)."""
    fatal, changed = [], []
    for name, now in current.items():
        before = recorded.get(name)
        if before is None:
            continue
        gone = [s for s, d in now.items() if d is None]
        if gone:
            fatal.append(f"{name}: {len(gone)} file(s) no longer in the data ({_show(gone)})")
        added, dropped = [s for s in now if s not in before], [s for s in before if s not in now]
        if added or dropped:
            fatal.append(f"splits/{name}.txt edited ({len(added)} stems added, {len(dropped)} removed: "
                         f"{_show(added + dropped)})")
        both = [s for s in now if s in before and now[s] is not None and before[s] is not None]
        images = [s for s in both if now[s][0] != before[s][0]]
        # a mask digest missing on either side was not recorded (e.g. unlabeled masks before they were): not compared
        masks = [s for s in both if None not in (now[s][1], before[s][1]) and now[s][1] != before[s][1]]
        if images:
            changed.append(f"{name}: {len(images)} image(s) changed ({_show(images)})")
        if masks:
            changed.append(f"{name}: {len(masks)} mask(s) changed ({_show(masks)})")
    return fatal, changed


def check_run(run_dir: Path, config: RunConfig, source: DataSource, splits: Splits, *, names: Iterable[str],
              accept_changed_data: bool, command: str, log: Callable[[str], None] = print,
              record_acceptance: bool = False, accept_missing_fingerprint: bool = False) -> None:
    """Refuse a run whose config or data changed since it was made (RunChangedError naming what changed).

    ``names`` are the splits whose data matter to ``command``; with ``accept_changed_data`` changed file
    contents are allowed (and, with ``record_acceptance``, recorded as the run's data from now on). A run
    without a fingerprint is refused by ``resume`` and, unless ``accept_missing_fingerprint``, by ``evaluate``:
    deleting one file must not be a way around these checks."""
    path = run_dir / FINGERPRINT
    if not path.is_file():
        if command == "resume":  # today's defaults could silently change what the unfinished stage does
            raise RunChangedError(f"{path} is missing (deleted, or the run was made by a semiseg before fingerprints): "
                                  "its config and data cannot be checked; restore the file, or train a new run: "
                                  f"semiseg train {run_dir / 'config.yaml'} --set name=NEW_NAME")
        if command == "evaluate" and not accept_missing_fingerprint:
            raise RunChangedError(f"{path} is missing (deleted, or the run was made by a semiseg before fingerprints): "
                                  "whether the run's config and data are still what it was made from cannot be "
                                  "checked; restore the file, or evaluate unchecked: --accept-missing-fingerprint")
        log(f"note: {path} is missing: the run's config and data are not checked")
        return
    try:
        fingerprint = json.loads(path.read_text())
        recorded_config, recorded_data = fingerprint["config"], fingerprint["data"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunChangedError(f"{path}: unreadable ({err}); the run cannot be checked, train it again") from None
    changes = config_changes(recorded_config, config)
    if changes:
        raise RunChangedError(
            f"{run_dir / 'config.yaml'} changed since the run was made ({'; '.join(changes[:5])}): a run's config "
            f"is fixed. Restore it, or train a new run with it: semiseg train {run_dir / 'config.yaml'} "
            "--set name=NEW_NAME")
    added = new_options(recorded_config, config)
    if added and command == "resume":
        raise RunChangedError(
            f"{run_dir} was made by an older semiseg: options added since ({'; '.join(added[:5])}) could change "
            "what its unfinished stages do; resume it with the version that made it, or train a new run: "
            f"semiseg train {run_dir / 'config.yaml'} --set name=NEW_NAME")
    if list(fingerprint.get("classes", source.classes.names)) != list(source.classes.names):
        raise RunChangedError(f"{run_dir}: the data's class table changed since the run was made "
                              f"({fingerprint.get('classes')} -> {list(source.classes.names)})")
    current = split_digests(config, source, splits, names)
    fatal, changed = data_changes(recorded_data, current)
    if fatal:
        raise RunChangedError(f"{run_dir}: the data changed since the run was made: {'; '.join(fatal + changed)}. "
                              f"Restore the files (and split lists) to {command} it")
    if changed and not accept_changed_data:
        raise RunChangedError(f"{run_dir}: the data changed since the run was made: {'; '.join(changed)}. Restore "
                              f"the files, or {command} with the data as it is now: --accept-changed-data")
    if changed:
        log(f"warning: {run_dir}: data changed since the run was made ({'; '.join(changed)}); accepted")
        if record_acceptance:
            recorded_data.update(current)
            fingerprint.setdefault("accepted_changes", []).append(
                {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changed})
            write_fingerprint(run_dir, fingerprint)
