"""Does `semiseg pilot` pick the bench's best method? (issue 30's measurement)

    python benchmarks/pilot_vs_bench.py --protocol polyp --seeds 0,1,2 --out-dir pilot-runs \
        --set data.root=../shared/data --set train.threads=1 [--share 0.25] [--methods st++,unimatch]

For each split seed alone (a user has one split), ``semiseg pilot`` runs its candidates and their compute-matched
controls on validation only, at ``share`` of the budget, and picks its winner. The bench's rows of that seed
(``benchmarks/results/<protocol>.json``: the full runs, test read once each) then say what the pick is worth on
test: the pick's test score, the best test score among the candidates and supervised, and the difference. The
pilot never reads test; this script reads the bench's recorded test scores, after the pick is made.

Each seed's row goes to ``benchmarks/results/<protocol>-pilot.json`` as it finishes, with the command and commit, and
a table to ``.md`` beside it; seeds already there are not piloted again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def bench_scores(protocol: str, seed: int, names: list[str], results: Path = RESULTS) -> dict[str, float]:
    """Test scores of the bench rows ``names`` (bench row names) on split ``seed`` (missing rows left out)."""
    doc = json.loads((results / f"{protocol}.json").read_text())
    return {e["method"]: float(e["test"]) for e in doc["entries"]
            if e["split_seed"] == seed and e["method"] in names and e.get("test") is not None}


def compare(protocol: str, seed: int, pick: str, candidates: list[str], results: Path = RESULTS) -> dict:
    """The pick against the bench's best of ``candidates`` + supervised on ``seed`` (test, from the bench)."""
    scores = bench_scores(protocol, seed, [*candidates, "supervised"], results)
    missing = [m for m in [pick, *candidates, "supervised"] if m not in scores]
    best = max(scores, key=scores.__getitem__) if scores else None
    row = {"split_seed": seed, "pick": pick, "pick_test": scores.get(pick), "bench_best": best,
           "bench_best_test": scores.get(best) if best else None, "bench_rows_missing": missing}
    if row["pick_test"] is not None and row["bench_best_test"] is not None:
        row["behind_best"] = row["bench_best_test"] - row["pick_test"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| split seed | pilot's pick | its bench test | bench best | its test | behind (points) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        def pct(v: float | None) -> str:
            return "—" if v is None else f"{v * 100:.1f}"
        behind = "—" if "behind_best" not in r else f"{r['behind_best'] * 100:.1f}"
        earlier = r.get("pick_by_gain")
        pick = r["pick"] + (f" (ranked by gain: {earlier})" if earlier and earlier != r["pick"] else "")
        lines.append(f"| {r['split_seed']} | {pick} | {pct(r['pick_test'])} | {r['bench_best'] or '—'} | "
                     f"{pct(r['bench_best_test'])} | {behind} |")
    within = [r for r in rows if "behind_best" in r]
    close = sum(r["behind_best"] <= 0.01 for r in within)
    lines.append(f"\nWithin 1 point of the bench's best: {close} of {len(within)} seeds with bench rows.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from semiseg import api
    from semiseg.atomic import atomic_write_text
    from semiseg.bench.pilot import DEFAULT_SHARE, advised, parse_methods, run_pilot

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default="polyp", help="a bundled protocol config with a bench results file")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--share", type=float, default=DEFAULT_SHARE)
    ap.add_argument("--methods", default=None, help="candidates, comma-separated (default: the pilot's)")
    ap.add_argument("--out-dir", type=Path, default=Path("pilot-runs"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=c")
    ap.add_argument("--results", type=Path, default=None, help="default benchmarks/results/<protocol>-pilot.json")
    args = ap.parse_args(argv)
    candidates = [m for m, _ in parse_methods(args.methods)]
    out = args.results or RESULTS / f"{args.protocol}-pilot.json"
    command = " ".join(["python benchmarks/pilot_vs_bench.py", *map(api.portable_arg, sys.argv[1:] if argv is None
                                                                     else argv)])
    # seeds already in the results file (same share and candidates) are kept and not piloted again: a session may
    # end between seeds
    rows = [reranked(r, args.protocol, candidates) for r in earlier_rows(out, args.share, candidates)]

    def save() -> None:
        rows.sort(key=lambda r: r["split_seed"])
        atomic_write_text(out, json.dumps({"share": args.share, "candidates": candidates, "rows": rows}, indent=1))
        atomic_write_text(out.with_suffix(".md"), table(rows) + "\n")

    for seed in (int(s) for s in args.seeds.split(",")):
        if any(r["split_seed"] == seed for r in rows):
            continue
        result = run_pilot(args.protocol, args.overrides, methods=args.methods, seeds=[seed], share=args.share,
                           out_dir=args.out_dir, log=lambda m: print(m, flush=True))
        row = compare(args.protocol, seed, advised(result.ranking), candidates, RESULTS)
        rows.append({**row, "ranking": [r.__dict__ for r in result.ranking], "pilot_seconds": result.seconds,
                     "command": command, "commit": api.git_commit(), "rank_by": "val"})
        save()
        print(f"split seed {seed}: pick {row['pick']}, bench best {row['bench_best']}", flush=True)
    if rows:
        save()  # seeds re-picked from their stored rankings
    print(table(rows))
    return 0


def reranked(row: dict, protocol: str, candidates: list[str]) -> dict:
    """A stored seed compared again with the bench file as it is now (a bench row may land after its seed's pilot).
    A seed piloted when the pilot ranked by gain over the control (rows without ``rank_by``) has its pick taken
    again from its stored ranking by validation, as the pilot now ranks; the earlier pick stays as
    ``pick_by_gain``. No run is repeated: every figure the rule needs was recorded."""
    if row.get("rank_by") == "val":
        return {**row, **compare(protocol, row["split_seed"], row["pick"], candidates, RESULTS)}
    from types import SimpleNamespace

    from semiseg.bench.pilot import advised

    pick = advised([SimpleNamespace(**r) for r in row["ranking"]])  # stored rankings: older ones hold fewer fields
    return {**row, **compare(protocol, row["split_seed"], pick, candidates, RESULTS), "rank_by": "val",
            "pick_by_gain": row["pick"]}


def earlier_rows(path: Path, share: float, candidates: list[str]) -> list[dict]:
    """The seeds an earlier run of the same measurement finished; another share or candidate list is refused."""
    if not path.is_file():
        return []
    doc = json.loads(path.read_text())
    if (doc.get("share"), doc.get("candidates")) != (share, candidates):
        raise SystemExit(f"error: {path}: holds share {doc.get('share')} with candidates {doc.get('candidates')}, "
                         f"not share {share} with {candidates}: give another --results")
    return list(doc["rows"])


if __name__ == "__main__":
    sys.exit(main())
