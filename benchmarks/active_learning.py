"""Does `suggest-labels` pick better images to annotate than chance? (issue 30's measured protocol)

    python benchmarks/active_learning.py --out-dir bench-runs --seeds 0,1,2 --k 33 \
        --set data.root=../shared/data --set train.threads=1 [--protocol polyp] \
        [--methods "supervised;st++:retrain_scale=2"] [--arms uncertain,random-0,random-1,random-2,confident]

For each split seed: the protocol's supervised run (5 % labels on polyp: 65 masks) is trained or read back; from
it ``suggest-labels`` picks K images by each arm, every arm's K masks are added to the labeled split
(``split.add_labeled``), and each method is trained again from scratch:

- ``uncertain``: the suggestion (least confident, near-duplicates skipped);
- ``random-0``, ``random-1``, ``random-2``: three seeded random draws of K;
- ``confident``: the K most confident (a sanity check: it should be the worst arm);
- ``typical``: ``--strategy typical``, the low-budget criterion (TypiClust: typical images of uncovered clusters).

Every method other than supervised also trains its own ``start`` (the method on the masks it started with, the bench
row's configuration) after the seed's arms: its gain per added mask is over that start, so that the gain of the
masks is told from the gain of the method.

Every run is resumable and reused when finished (``api.finish``); validation picks each run's checkpoint, test is
read once per run. Each row goes to ``RESULTS`` (default ``benchmarks/results/polyp-al.json``) as it finishes, with
its command and commit; rows already there are not run again (a protocol longer than a session resumes). A table
(test Dice per arm and seed, the mean, and the gain per added mask over the method's start) is written next to it as
``.md`` and printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ARMS = ("uncertain", "random-0", "random-1", "random-2", "confident", "typical")
PICKED_FILE = "suggestion.json"  # the arm's suggestion (stems, scores, how many per source dataset)


def arm_strategy(arm: str) -> tuple[str, int]:
    return ("random", int(arm.split("-")[1])) if arm.startswith("random-") else (arm, 0)


def main(argv: list[str] | None = None) -> int:
    from semiseg import api
    from semiseg.atomic import atomic_write_text
    from semiseg.report.suggest import LIST_FILE, suggest_labels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="polyp", help="a bundled protocol config")
    ap.add_argument("--out-dir", type=Path, default=Path("bench-runs"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--k", type=int, default=33, help="masks added per arm")
    ap.add_argument("--methods", default="supervised", help=(
        "methods retrained with the added masks, ';'-separated, each METHOD[:option=value,...] (its bench options)"))
    ap.add_argument("--arms", default=",".join(ARMS), help=(
        "the arms to run, ','-separated (default all; the issue's comparison needs uncertain, random-0..2, confident)"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=c")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/polyp-al.json"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.split(":", 1) for m in args.methods.split(";")]
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"error: --arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    quiet = {"log": lambda *a, **k: None}
    command = " ".join(["python benchmarks/active_learning.py", *map(api.portable_arg, sys.argv[1:])])
    # rows already in RESULTS are kept and not run again: a protocol longer than a session resumes row by row
    rows = load_rows(args.results, args.protocol, args.k)

    def save(row: dict) -> None:
        rows.append({**row, "command": command, "commit": api.git_commit()})
        write_results(args.results, args.protocol, args.k, rows)

    def train(base: list[str], name: str, method: str, options: list[str], *more: str, **row: object) -> None:
        """Train (or read back) ``method`` with its bench options and save its row."""
        extra = [f"method.{o}" for part in options for o in part.split(",") if o]
        cfg = api.load_config(args.protocol, [*base, f"name={name}", f"method.name={method}", *extra, *more])
        res, _ = api.finish(cfg, **quiet)
        save({**row, "method": method, "options": options,
              "test": res["test"]["headline"], "val": res["val"].get(res["val_metric"])})
        print(f"seed {row['split_seed']} {method:<12} {row['arm']:<10} test {rows[-1]['test']:.4f}", flush=True)

    for seed in seeds:
        done = {row_key(**r) for r in rows}
        todo = [(arm, method, options) for arm in arms for method, *options in methods
                if row_key(seed, method, options, arm) not in done]
        starts_todo = [(method, options) for method, *options in methods if method != "supervised"
                       and row_key(seed, method, options, "start") not in done]
        have_start = row_key(seed, "supervised", [], "start") in done
        if not todo and not starts_todo and have_start:
            continue
        base = [*args.overrides, f"split.seed={seed}", f"out_dir={args.out_dir}", "train.progress=false"]
        start_cfg = api.load_config(args.protocol, [*base, f"name={args.protocol}-s{seed}-supervised"])
        start, _ = api.finish(start_cfg, **quiet)
        start_run = args.out_dir / start_cfg.name
        if not have_start:
            save({"split_seed": seed, "method": "supervised", "options": [], "arm": "start", "added": 0,
                  "test": start["test"]["headline"], "val": start["val"].get(start["val_metric"])})
        for arm, method, options in todo:
            strategy, draw = arm_strategy(arm)
            picks = args.out_dir / f"al-s{seed}-{arm}"
            if not (picks / LIST_FILE).is_file():
                picked = suggest_labels(start_run, args.k, out_dir=picks, strategy=strategy,  # type: ignore[arg-type]
                                        seed=draw, progress=False, **quiet)
                atomic_write_text(picks / PICKED_FILE, json.dumps(picked.to_dict(), indent=1))
            per_subset = json.loads((picks / PICKED_FILE).read_text()).get("per_subset") \
                if (picks / PICKED_FILE).is_file() else None
            train(base, f"al-s{seed}-{arm}-{method}", method, options, f"split.add_labeled={picks / LIST_FILE}",
                  split_seed=seed, arm=arm, added=args.k, per_subset=per_subset)
        for method, options in starts_todo:
            # the method's own start (its gain per added mask is over it, not over supervised's): trained
            # after the seed's arms, on the protocol's split with no mask added (the bench row's configuration)
            train(base, f"{args.protocol}-s{seed}-{method}", method, options, split_seed=seed, arm="start", added=0)
    write_results(args.results, args.protocol, args.k, rows)
    print(markdown(rows, args.k))
    return 0


def row_key(split_seed: int, method: str, options: list[str], arm: str, **_: object) -> tuple:
    return split_seed, method, tuple(options), arm


def load_rows(path: Path, protocol: str, k: int) -> list[dict]:
    """The rows of an earlier (partial) run of the protocol, refused if it measured another protocol or K."""
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
        held = (doc["protocol"], doc["k"])
        rows = list(doc["rows"])
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"error: {path}: not an active-learning results file ({err})") from None
    if held != (protocol, k):
        raise SystemExit(f"error: {path}: holds protocol {held[0]} with k={held[1]}, not {protocol} with k={k}: "
                         "give another --results")
    return rows


def write_results(path: Path, protocol: str, k: int, rows: list[dict]) -> None:
    from semiseg.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"protocol": protocol, "k": k, "rows": rows}, indent=1) + "\n")
    atomic_write_text(path.with_suffix(".md"), markdown(rows, k))


def markdown(rows: list[dict], k: int) -> str:
    """Test Dice per method and arm: per split seed, the mean, and the gain per added mask over the method's own
    start (the method trained on the masks it started with). Each method's mean and gain are taken over the seeds
    where every arm of it and its start have a row, so that arms are compared on the same seeds while a protocol
    is partly run."""
    seeds = sorted({r["split_seed"] for r in rows})
    lines = ["| method | arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | Dice points per added mask |",
             "|---|---|" + "---|" * len(seeds) + "---|---|"]
    complete: dict[str, list[int]] = {}

    def cells(got: dict[int, float]) -> str:
        return " | ".join(f"{100 * got[s]:.1f}" if s in got else "—" for s in seeds)

    for method in sorted({r["method"] for r in rows}, key=lambda m: (m != "supervised", m)):
        of_method = [r for r in rows if r["method"] == method]
        start = {r["split_seed"]: r["test"] for r in of_method if r["arm"] == "start"}
        arms = {arm: {r["split_seed"]: r["test"] for r in of_method if r["arm"] == arm} for arm in ARMS}
        arms = {arm: got for arm, got in arms.items() if got}
        common = complete[method] = sorted(set(start).intersection(*arms.values()))
        for arm, got in arms.items():
            mean = f"{100 * statistics.fmean(got[s] for s in common):.1f}" if common else "—"
            gain = f"{statistics.fmean(got[s] - start[s] for s in common) * 100 / k:+.3f}" if common else "—"
            lines.append(f"| {method} | {arm} | {cells(got)} | {mean} | {gain} |")
        if start:
            mean = f"{100 * statistics.fmean(start[s] for s in common):.1f}" if common else "—"
            lines.append(f"| {method} | start (no mask added) | {cells(start)} | {mean} | |")
    seeds_of = "; ".join(f"{m}: {', '.join(map(str, got)) or 'none yet'}" for m, got in complete.items())
    lines.append(f"\nMeans and gains over the split seeds where the method's start and every arm have a row "
                 f"({seeds_of}). The gain per added mask is over the method's own start.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
