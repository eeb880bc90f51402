"""``semiseg bench PROTOCOL``: the method matrix over split seeds with one shared budget.

Resumable (a finished run is read back, an unfinished one resumed), stage-sharing (all runs of a bench
live under one ``out_dir``, so identical supervised teachers are trained once), and merged: each finished
run is written into the protocol's results JSON at once, so partial benches and benches of different
sessions combine into one table. Several processes may run the same bench side by side (one per core): a run
another process trains is skipped, and one whose shared teacher another process is training waits at the
back of the queue (:mod:`semiseg.locks`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from semiseg.api import config_from_dict
from semiseg.bench.tables import budget_of, entry_from_results, load_entries, load_sessions, merge, save_entries
from semiseg.config import RunConfig, apply_overrides, bundled_config
from semiseg.errors import ConfigError, RunBusyError, RunInterrupted, SemisegError, StageBusyError
from semiseg.provenance import git_commit, portable_arg, recorded_command


class BenchError(SemisegError):
    """Some runs of a bench failed; every other run finished and is recorded."""


def bench_spec(protocol: str) -> dict[str, Any]:
    """The bundled matrix of a protocol: methods with their bench options, and split seeds."""
    path = Path(str(files("semiseg") / "configs" / f"bench-{protocol}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no bench spec for protocol {protocol!r} (expected configs/bench-{protocol}.yaml)")
    return yaml.safe_load(path.read_text())


def run_config(protocol: str, entry: str, options: dict[str, Any], seed: int, out_dir: Path,
               overrides: list[str], spec_overrides: list[str] | None = None) -> Any:
    """One run of the matrix: protocol config < the spec's overrides < the entry's ``set`` < ``overrides``.

    An entry runs the method of its name, or the one its ``method`` key names (a second row of one method
    with other settings, e.g. supervised trained for as many steps as a method that fine-tunes its teacher)."""
    path = bundled_config(protocol)
    if path is None:
        raise ConfigError(f"unknown protocol {protocol!r}: bundled configs are polyp, camvid, demo")
    raw = yaml.safe_load(path.read_text())
    options = dict(options)
    method = options.pop("method", entry)
    raw = apply_overrides(raw, list(spec_overrides or []) + list(options.pop("set", [])) + list(overrides))
    raw.update(name=f"{protocol}-s{seed}-{entry}", out_dir=str(out_dir))
    raw.setdefault("split", {})["seed"] = seed
    raw["method"] = {"name": method, **options}
    return config_from_dict(raw, origin=f"bench {protocol}/{entry}/seed {seed}")


@contextlib.contextmanager
def _locked(results_path: Path) -> Iterator[None]:
    """Several bench processes (e.g. disjoint ``--methods`` on two cores) may share one results file."""
    import fcntl

    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# keys that say where or how fast a run executes, not what it computes
_RUNTIME_KEYS = {"out_dir", "data.root", "data.cache_dir", "train.progress", "train.threads", "train.num_workers",
                 "train.device", "train.tensorboard"}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_drift(run_dir: Path, wanted: Any) -> list[str]:
    """Keys where an existing run directory's config differs from the one the bench would run now."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    raw = yaml.safe_load(path.read_text()) or {}
    try:  # read as a resume reads it: a field added since the run was made takes its default
        raw = config_from_dict(raw, origin=str(path)).model_dump(mode="json")
    except SemisegError:
        pass  # a config today's code rejects is compared as written
    have = _flat(raw)
    want = _flat(wanted.model_dump(mode="json"))
    return [f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(have) | set(want))
            if k not in _RUNTIME_KEYS and have.get(k) != want.get(k)]


def record(results_path: Path, entry: dict) -> None:
    """Merge one entry into the results file."""
    with _locked(results_path):
        save_entries(results_path, merge(load_entries(results_path), [entry]))


def record_session(results_path: Path, session: dict) -> None:
    """Append one whole bench invocation to the results file."""
    with _locked(results_path):
        save_entries(results_path, load_entries(results_path), load_sessions(results_path) + [session])


def expected_seconds(method: str, known: list[dict], done_times: list[float]) -> float:
    """ETA of one run: this method's wall time on other split seeds, else the mean of runs done so far."""
    same = [e["wall_seconds"] for e in known if e["method"] == method and e.get("wall_seconds")]
    if same:
        return sum(same) / len(same)
    pool = done_times or [e["wall_seconds"] for e in known if e.get("wall_seconds")]
    return sum(pool) / len(pool) if pool else 0.0


def check_data(configs: Iterable[RunConfig]) -> None:
    """Open each distinct data source of ``configs`` once: a wrong ``data.root`` fails the bench here, with one
    message, instead of failing every run of the matrix one after the other."""
    from semiseg.data.presets import load_source

    distinct = {json.dumps(c.data.model_dump(mode="json"), sort_keys=True): c.data for c in configs}
    for data in distinct.values():
        load_source(data.source, data.root, **data.options)


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
    overrides, spec_overrides = list(overrides or []), list(spec.get("overrides", []))
    jobs = [(s, m) for s in seeds for m in methods]
    configs = [run_config(protocol, m, matrix[m] or {}, s, out_dir, overrides, spec_overrides) for s, m in jobs]
    # a finished run made with another config must not be read back as this one
    drift = {cfg.name: changed for cfg in configs if (changed := config_drift(out_dir / cfg.name, cfg))}
    if drift:
        raise ConfigError("these run directories were made with another config; move them away (or use another "
                          "--out-dir) to run them again:\n" + "\n".join(
                              f"  {out_dir / name}: {'; '.join(changes[:4])}" for name, changes in drift.items()))
    check_data(cfg for cfg in configs if not (out_dir / cfg.name / "results.json").is_file())
    known = [e for e in load_entries(results_path) if e["protocol"] == protocol]
    t_start, done_times, failures, busy, read_back = time.time(), [], [], [], 0
    queue, deferred = deque(range(len(jobs))), set()
    while queue:
        k = queue.popleft()
        cfg, entry = configs[k], jobs[k][1]
        run_dir = out_dir / cfg.name
        t0 = time.time()
        if (run_dir / "results.json").is_file():
            results = json.loads((run_dir / "results.json").read_text())
            log(f"[{k + 1}/{len(jobs)}] {cfg.name}: finished earlier, read back")
            read_back += 1
        else:
            log(f"[{k + 1}/{len(jobs)}] {cfg.name}: {'resuming' if run_dir.exists() else 'starting'}")
            # a run whose shared teacher another process is training now waits for it only when every run left
            # is in that state; otherwise it goes to the back of the queue and this process trains another
            wait = all(j in deferred for j in (k, *queue))
            try:
                results, executed = api.finish(cfg, console=console, log=log, wait_for_shared=wait)
            except StageBusyError as err:
                deferred.add(k)
                queue.append(k)
                log(f"    later: {err}")
                continue
            except RunBusyError as err:  # another process trains it (a bench sharing out_dir records it)
                busy.append(cfg.name)
                log(f"    skipped: {err}")
                continue
            except RunInterrupted:
                raise  # Ctrl-C stops the bench; the run resumes next time
            except Exception as err:  # noqa: BLE001 - one broken method must not stop the matrix
                failures.append(f"{cfg.name}: {type(err).__name__}: {err}")
                log(f"    FAILED {failures[-1]} (the bench goes on; `semiseg resume {run_dir}` retries it)")
                continue
            if executed:
                done_times.append(time.time() - t0)
            else:  # another process finished it between the check above and taking its lock
                log("    finished by another process meanwhile, read back")
                read_back += 1
        if results.get("trained_steps") is None and cfg.method.name in ("supervised", "oracle"):
            results = {**results, "trained_steps": cfg.train.steps}  # read back from a run that predates the field
        record(results_path, entry_from_results(protocol, results, budget=budget_of(cfg), entry=entry))
        eta = sum(expected_seconds(jobs[j][1], known, done_times) for j in queue)
        log(f"    test {results.get('val_metric')}: {(results.get('test') or {}).get('headline')}; "
            f"elapsed {(time.time() - t_start) / 60:.1f} min, ETA {eta / 60:.1f} min for {len(queue)} more")
    elapsed = time.time() - t_start
    record_session(results_path, {
        "seeds": seeds, "methods": methods, "executed": len(done_times), "read_back": read_back,
        "failed": failures, "busy": busy, "elapsed_seconds": round(elapsed, 1), "cpu_cores": os.cpu_count(),
        "overrides": [portable_arg(o) for o in spec_overrides + overrides],
        "command": recorded_command(),
        "commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log(f"bench {protocol}: {len(done_times)} runs executed, {read_back} read back, {len(failures)} failed"
        + (f", {len(busy)} left to the other process training them" if busy else "") + f" in {elapsed / 60:.1f} min")
    from semiseg.report import write_compare_report

    # a failed run has nothing to compare
    finished = [out_dir / c.name for c in configs if (out_dir / c.name / "results.json").is_file()]
    if finished:
        write_compare_report(finished, out_dir / f"{protocol}-compare.html", log=log)
    if failures:
        raise BenchError(f"{len(failures)} of {len(jobs)} runs failed (the others are recorded):\n  "
                         + "\n  ".join(failures))
    return load_entries(results_path)
