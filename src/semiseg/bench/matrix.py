"""``semiseg bench PROTOCOL``: the method matrix over split seeds with one shared budget.

Resumable (a finished run is read back, an unfinished one resumed), stage-sharing (all runs of a bench
live under one ``out_dir``, so identical supervised teachers are trained once), and merged: each finished
run is written into the protocol's results JSON at once, so partial benches and benches of different
sessions combine into one table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from semiseg.bench.tables import entry_from_results, load_entries, merge, save_entries
from semiseg.config import apply_overrides, bundled_config, config_from_dict
from semiseg.errors import ConfigError


def bench_spec(protocol: str) -> dict[str, Any]:
    """The bundled matrix of a protocol: methods with their bench options, and split seeds."""
    path = Path(str(files("semiseg") / "configs" / f"bench-{protocol}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no bench spec for protocol {protocol!r} (expected configs/bench-{protocol}.yaml)")
    return yaml.safe_load(path.read_text())


def run_config(protocol: str, method: str, options: dict[str, Any], seed: int, out_dir: Path,
               overrides: list[str]) -> Any:
    path = bundled_config(protocol)
    if path is None:
        raise ConfigError(f"unknown protocol {protocol!r}: bundled configs are polyp, camvid, demo")
    raw = yaml.safe_load(path.read_text())
    raw = apply_overrides(raw, overrides)
    raw.update(name=f"{protocol}-s{seed}-{method}", out_dir=str(out_dir))
    raw.setdefault("split", {})["seed"] = seed
    raw["method"] = {"name": method, **options}
    return config_from_dict(raw, origin=f"bench {protocol}/{method}/seed {seed}")


def record(results_path: Path, entry: dict) -> None:
    """Merge one entry into the results file under a lock (several bench processes may share it)."""
    import fcntl

    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        save_entries(results_path, merge(load_entries(results_path), [entry]))


def run_bench(protocol: str, *, methods: list[str] | None = None, seeds: list[int] | None = None,
              out_dir: Path = Path("bench-runs"), results_path: Path | None = None,
              overrides: list[str] | None = None, log: Callable[[str], None] = print,
              console: Any = None) -> list[dict]:
    """Run (or resume, or read back) every (seed, method) of the matrix; returns the merged entries."""
    from semiseg import api

    spec = bench_spec(protocol)
    matrix: dict[str, dict] = spec["methods"]
    methods = methods or list(matrix)
    unknown = [m for m in methods if m not in matrix]
    if unknown:
        raise ConfigError(f"bench {protocol}: no bench options for {unknown}; known: {', '.join(matrix)}")
    seeds = seeds if seeds is not None else list(spec.get("seeds", [0]))
    results_path = results_path or Path("benchmarks") / "results" / f"{protocol}.json"
    overrides = list(spec.get("overrides", [])) + list(overrides or [])
    jobs = [(s, m) for s in seeds for m in methods]
    t_start, done_times, failures = time.time(), [], []
    for k, (seed, method) in enumerate(jobs):
        cfg = run_config(protocol, method, matrix[method] or {}, seed, out_dir, overrides)
        run_dir = out_dir / cfg.name
        t0 = time.time()
        if (run_dir / "results.json").is_file():
            results = json.loads((run_dir / "results.json").read_text())
            log(f"[{k + 1}/{len(jobs)}] {cfg.name}: finished earlier, read back")
        else:
            log(f"[{k + 1}/{len(jobs)}] {cfg.name}: {'resuming' if run_dir.exists() else 'starting'}")
            try:
                results = (api.resume(run_dir, console=console, log=log) if (run_dir / "config.yaml").is_file()
                           else api.run(cfg, console=console, log=log))
            except Exception as err:  # noqa: BLE001 - one broken method must not stop the matrix
                failures.append(f"{cfg.name}: {type(err).__name__}: {err}")
                log(f"    FAILED {failures[-1]} (the bench goes on; `semiseg resume {run_dir}` retries it)")
                continue
            done_times.append(time.time() - t0)
        record(results_path, entry_from_results(protocol, results))
        remaining = len(jobs) - k - 1
        eta = (sum(done_times) / len(done_times) * remaining) if done_times else 0.0
        log(f"    test {results.get('val_metric')}: {(results.get('test') or {}).get('headline')}; "
            f"elapsed {(time.time() - t_start) / 60:.1f} min, ETA {eta / 60:.1f} min for {remaining} more")
    from semiseg.report import write_compare_report

    run_dirs = [out_dir / run_config(protocol, m, matrix[m] or {}, s, out_dir, overrides).name for s, m in jobs]
    write_compare_report(run_dirs, out_dir / f"{protocol}-compare.html", log=log)
    if failures:
        log("failed runs:\n  " + "\n  ".join(failures))
    return load_entries(results_path)
