"""How much does one CVC-ClinicDB video sequence swing the test mean? (sizing the fixed polyp test split)

    python benchmarks/clinic_sequence_spread.py RUN_DIR [--frames 69 122]

Scores a finished polyp run's delivered model on every CVC-ClinicDB frame that is neither in its test split
nor labeled (its validation and unlabeled frames: never test), per video sequence, and prints the per-sequence
mean Dice, their spread, and the spread of a ClinicDB subset mean over random whole-sequence draws of about
``--frames`` frames (the way the fixed test split is drawn). No test image is read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    from semiseg import api
    from semiseg.evaluation.evaluator import evaluate_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--frames", type=int, nargs="+", default=[69, 122], help="subset sizes to simulate")
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    ctx, model = api.load_run(args.run)
    group = {s.stem: str(s.group) for s in ctx.source.samples if s.stem.startswith("cvc-clinicdb/")}
    stems = [s for s in ctx.splits.val + ctx.splits.unlabeled if s in group]
    res = evaluate_source(model, ctx.source, stems, protocol=ctx.config.eval.protocol,
                          size=tuple(ctx.config.data.size), device=ctx.device)
    per_seq: dict[str, list[float]] = {}
    for rec in res.per_image:
        per_seq.setdefault(group[rec["stem"]], []).append(rec["dice"])
    seqs = sorted(per_seq, key=lambda g: int(g) if g.isdigit() else g)
    for g in seqs:
        print(f"sequence {g:>4}: {len(per_seq[g]):3d} frames, mean Dice {statistics.fmean(per_seq[g]):.3f}")
    means = [statistics.fmean(per_seq[g]) for g in seqs]
    print(f"{len(seqs)} sequences, {len(stems)} frames: per-sequence mean Dice {statistics.fmean(means):.3f} "
          f"± {statistics.stdev(means):.3f} (std over sequences)")
    rng = np.random.default_rng(0)
    for target in args.frames:
        draws = []
        for _ in range(args.draws):
            taken, scores = 0, []
            for i in rng.permutation(len(seqs)):
                if taken >= target:
                    break
                scores += per_seq[seqs[i]]
                taken += len(per_seq[seqs[i]])
            draws.append(statistics.fmean(scores))
        print(f"subset of >= {target} frames in whole sequences: mean Dice {statistics.fmean(draws):.3f} "
              f"± {statistics.stdev(draws):.3f} (std over {args.draws} random draws)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
