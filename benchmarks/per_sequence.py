"""Test mIoU of finished runs per video sequence (issue 29's "why camvid shows no gain").

    python benchmarks/per_sequence.py RUN_DIR... [--out benchmarks/results/<protocol>-videos.json]

(``benchmarks/results/camvid-videos.json``: the camvid bench rows of split seeds 0-1; BENCHMARKS.md shows its
``.md`` table.)

CamVid's official test frames come from two videos: the end of 0001TP (a sequence whose earlier frames are in the
train pool) and Seq05VD (a street no train frame shows). A run's recorded test score pools both; this splits it by
the stem's sequence (the part before the last ``_``), from the run's delivered model on its own test split, and
checks that the per-sequence confusion matrices add up to the recorded score. It re-reads test for this breakdown
only: nothing is chosen from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from semiseg.evaluation.evaluator import evaluate_source
from semiseg.evaluation.metrics import mean_iou
from semiseg.finished import load_run
from semiseg.provenance import git_commit, portable_arg


def sequence_of(stem: str) -> str:
    """``0001TP_008550`` -> ``0001TP``; a stem without ``_`` is its own sequence."""
    return stem.rsplit("_", 1)[0]


def by_sequence(run_dir: Path) -> dict:
    ctx, model = load_run(run_dir, check=("test",), command="evaluate", log=lambda m: None)
    cfg = ctx.config
    groups: dict[str, list[str]] = defaultdict(list)
    for stem in ctx.splits.test:
        groups[sequence_of(stem)].append(stem)
    row: dict = {"run": run_dir.name, "method": cfg.method.name, "split_seed": cfg.split.seed, "sequences": {}}
    total = None
    for seq, stems in sorted(groups.items()):
        res = evaluate_source(model, ctx.source, stems, protocol=cfg.eval.protocol, size=tuple(cfg.data.size),
                              window=cfg.eval.window, stride=cfg.eval.stride, device=ctx.device).to_dict()
        cm = np.asarray(res["confusion_matrix"])
        total = cm if total is None else total + cm
        row["sequences"][seq] = {"images": len(stems), "miou": res["miou"]}
    recorded = json.loads((run_dir / "results.json").read_text())["test"]["miou"]
    row["pooled"], row["recorded"] = float(mean_iou(total, "exclude")), recorded
    if abs(row["pooled"] - recorded) > 1e-4:
        raise SystemExit(f"{run_dir}: the sequences pool to {row['pooled']:.4f}, the run recorded {recorded:.4f}")
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one line per run, test mIoU per sequence (its frames in the header) and pooled."""
    seqs = sorted({k: v["images"] for r in rows for k, v in r["sequences"].items()}.items())
    head = "| split seed | run | " + " | ".join(f"{k} ({n} frames)" for k, n in seqs) + " | pooled |"
    lines = [head, "|" + "---|" * (len(seqs) + 3)]
    for r in rows:
        cells = [f"{r['sequences'][k]['miou'] * 100:.1f}" if k in r["sequences"] else "—" for k, _ in seqs]
        lines.append(f"| {r['split_seed']} | {r['run']} | " + " | ".join(cells) + f" | {r['pooled'] * 100:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here, and their table beside it (.md)")
    args = ap.parse_args()
    command = " ".join(["python benchmarks/per_sequence.py", *map(portable_arg, sys.argv[1:])])
    rows = []
    for run in args.runs:
        row = {**by_sequence(run), "command": command, "commit": git_commit()}
        rows.append(row)
        seqs = ", ".join(f"{k} {v['miou'] * 100:.1f} ({v['images']})" for k, v in row["sequences"].items())
        print(f"{row['run']}: {seqs}; pooled {row['pooled'] * 100:.1f} (recorded {row['recorded'] * 100:.1f})",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table(rows))


if __name__ == "__main__":
    main()
