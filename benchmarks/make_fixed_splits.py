"""Regenerate the benchmark's fixed test splits (src/semiseg/splits/{polyp,camvid}/test.txt) from the data.

    python benchmarks/make_fixed_splits.py --data ../shared/data          # write the files
    python benchmarks/make_fixed_splits.py --data ../shared/data --check  # compare, exit 1 on a difference

The rules are in ``semiseg.data.splits.polyp_test_split`` / ``camvid_test_split`` (BENCHMARK.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semiseg.data.splits import packaged_split, regenerate_fixed_splits

OUT = Path(__file__).resolve().parents[1] / "src" / "semiseg" / "splits"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"),
                    help="folder holding kvasir-seg/, cvc-clinicdb/ and camvid/")
    ap.add_argument("--out", type=Path, default=OUT, help="split folder to write (default: the package's)")
    ap.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = ap.parse_args()
    if args.check:
        result = regenerate_fixed_splits(args.data)
        differ = [p for p, stems in result.items() if stems != packaged_split(p)]
        for p in result:
            print(f"{p}: {len(result[p])} stems, {'DIFFERENT' if p in differ else 'identical'}")
        return 1 if differ else 0
    result = regenerate_fixed_splits(args.data, args.out)
    for p, stems in result.items():
        print(f"wrote {args.out / p / 'test.txt'} ({len(stems)} stems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
