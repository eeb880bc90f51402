"""A run directory, made whole or reopened and checked: the config bound to the registered methods, data and splits
loaded, a fresh directory validated completely before it appears, a reopened one compared with its fingerprint.
:mod:`semiseg.api` (training) and :mod:`semiseg.finished` (using a finished run) both start here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from semiseg import config as config_layer
from semiseg.atomic import atomic_write_text, publish_directory, remove_stale_temporaries
from semiseg.config import RunConfig, dump_config
from semiseg.data.presets import load_source
from semiseg.data.sources import read_stem_list
from semiseg.data.splits import SPLIT_NAMES, Splits, make_splits
from semiseg.engine.checkpoint import seed_everything
from semiseg.engine.distributed import barrier, init_distributed, resolve_device
from semiseg.errors import ConfigError, DataError, RunChangedError
from semiseg.methods.registry import get_method
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.integrity import check_run, make_fingerprint, write_fingerprint
from semiseg.pipeline.preflight import check_split_masks, preflight_run


def config_from_dict(raw: dict[str, Any], origin: str = "config") -> RunConfig:
    """Validate a whole config (:func:`semiseg.config.config_from_dict`) against the registered methods: the
    ``method`` section becomes the chosen method's options model, checked by its ``Method.check_config``."""
    return config_layer.config_from_dict(raw, origin, methods=get_method)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (a file or a bundled protocol; defaults when ``path`` is None), apply ``--set``
    overrides and validate it against the registered methods (:func:`semiseg.config.load_config`)."""
    return config_layer.load_config(path, overrides, methods=get_method)


def _splits_for(config: RunConfig, source: Any) -> Splits:
    if config.split.files:
        splits = Splits.read(Path(config.split.files), known=source.by_stem())
        check_split_masks(source, splits, config.split.files)
    else:
        splits = make_splits(source, seed=config.split.seed, labeled=config.split.labeled, val=config.split.val,
                             test=config.split.test, fixed=source.fixed_splits, group_aware=config.split.group_aware)
    return _with_added_labels(splits, source, config.split.add_labeled) if config.split.add_labeled else splits


def _with_added_labels(splits: Splits, source: Any, path: str) -> Splits:
    """``splits`` with the unlabeled stems listed in ``path`` moved to labeled (each needs its mask now)."""
    added = read_stem_list(Path(path), known=source.by_stem())
    pool = set(splits.unlabeled)
    outside = [s for s in added if s not in pool]
    if outside:
        raise ConfigError(f"split.add_labeled={path}: {len(outside)} stem(s) are not unlabeled images of this split "
                          f"(e.g. {outside[0]!r}); list stems of the run's unlabeled.txt")
    no_mask = [s for s in added if source.by_stem()[s].mask is None]
    if no_mask:
        raise DataError(f"split.add_labeled={path}: {len(no_mask)} stem(s) have no mask yet (e.g. {no_mask[0]!r}); "
                        "add their masks to the data folder first")
    moved = set(added)
    return Splits(labeled=[*splits.labeled, *added], unlabeled=[s for s in splits.unlabeled if s not in moved],
                  val=splits.val, test=splits.test)


def prepare(config: RunConfig, run_dir: Path, *, console: Any = None, fresh: bool,
            check: tuple[str, ...] = SPLIT_NAMES, accept_changed_data: bool = False, command: str = "resume",
            accept_missing_fingerprint: bool = False, source: Any = None, log: Any = print) -> RunContext:
    """Load data and splits, create (or reopen and check) the run directory, set seeds and the device.

    A fresh run is validated completely before its directory appears (:func:`preflight_run`); a reopened one
    is compared with its fingerprint (config, and the data of the splits in ``check``). ``source``: use it
    instead of loading the config's data (a reopened run whose own data is not needed)."""
    device = resolve_device(config.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if config.train.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, read when its first handle is made (after this)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    source = source or load_source(config.data.source, config.data.root, **config.data.options)
    if fresh:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run directory {run_dir} already exists: continue it with `semiseg resume {run_dir}` "
                              "or choose another name (--set name=...)")
        splits = _splits_for(config, source)
        ctx = RunContext(config, run_dir, source, splits, device, dist, console)
        if dist.is_main:
            preflight_run(ctx, log)
            _create_run_dir(run_dir, config, splits, make_fingerprint(config, source, splits))
        barrier()
    else:
        if dist.is_main:
            for path in remove_stale_temporaries(run_dir):
                log(f"note: removed {path}, left by a writer that was killed")
        try:
            splits = Splits.read(run_dir / "splits")
        except DataError as err:
            raise RunChangedError(f"{run_dir}: the run's split lists are unusable ({err})") from None
        ctx = RunContext(config, run_dir, source, splits, device, dist, console)
        check_run(run_dir, config, source, splits, names=check, accept_changed_data=accept_changed_data,
                  command=command, log=log, record_acceptance=command == "resume" and dist.is_main,
                  accept_missing_fingerprint=accept_missing_fingerprint)
    seed_everything(config.seed)
    return ctx


def _create_run_dir(run_dir: Path, config: RunConfig, splits: Splits, fingerprint: dict[str, Any]) -> None:
    """Splits, config and fingerprint appear together or not at all: a kill mid-creation leaves no half run
    directory."""
    # an existing run_dir is empty (checked by the caller); a SIGKILL leaves a hidden .NAME.<writer>.*.tmp that
    # the next run here removes
    with publish_directory(run_dir) as tmp:
        splits.write(tmp / "splits")
        atomic_write_text(tmp / "config.yaml", dump_config(config))
        write_fingerprint(tmp, fingerprint)


def read_run_config(run_dir: Path) -> RunConfig:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return load_config(run_dir / "config.yaml")
