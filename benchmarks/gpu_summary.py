"""summary.md and summary.json of `benchmarks/gpu_check.sh`: CUDA test counts, throughput against the bare loop,
and each polyp run of split seed 0 (wall time, test Dice) beside the CPU row of the same method and seed.

    python benchmarks/gpu_summary.py --out OUT --cpu-results benchmarks/results/polyp.json --seconds S --device D
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

METHODS = ("supervised", "st++", "unimatch", "oracle")
# README: supervised trained twice on the same split moved its test Dice by -3.3 to +2.9 points (demo seeds);
# a GPU row within this of the CPU row is within run-to-run noise
NOISE = 0.033


def cuda_tests(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"ran": False}
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}  # type: ignore[union-attr]
    failed = []
    for case in suites.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed.append(f"{case.get('name')}: {problem.get('message', '')[:200]}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"ran": True, **counts, "passed": passed, "failed": failed}


def latest_rows(path: Path, seed: int = 0) -> dict[str, dict[str, Any]]:
    """The latest-finished row per method of split seed ``seed`` (entries are appended as runs finish)."""
    if not path.exists():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for row in json.loads(path.read_text()).get("entries", []):
        if row.get("split_seed") == seed:
            rows[row["method"]] = row
    return rows


def summarize(out: Path, cpu_results: Path, seconds: float, device: str) -> dict[str, Any]:
    gpu, cpu = latest_rows(out / "polyp.json"), latest_rows(cpu_results)
    runs = []
    for method in METHODS:
        g, c = gpu.get(method), cpu.get(method)
        row: dict[str, Any] = {"method": method, "finished": g is not None}
        if g:
            row.update(wall_seconds=g.get("wall_seconds"), test_dice=g.get("test"),
                       trained_steps=g.get("trained_steps"))
        if c:
            row.update(cpu_test_dice=c.get("test"), cpu_wall_seconds=c.get("wall_seconds"), cpu_commit=c.get("commit"))
        if g and c and g.get("test") is not None and c.get("test") is not None:
            row["difference"] = g["test"] - c["test"]
            row["within_noise"] = abs(row["difference"]) <= NOISE
        runs.append(row)
    throughput_path = out / "throughput.json"
    throughput = json.loads(throughput_path.read_text()) if throughput_path.exists() else None
    return {"device": device, "seconds": seconds, "cuda_tests": cuda_tests(out / "cuda-tests.xml"),
            "throughput": throughput, "polyp_seed0": runs, "noise": NOISE}


def markdown(s: dict[str, Any]) -> str:
    lines = [f"# GPU check ({s['device']}), {s['seconds']:.0f} s", ""]
    t = s["cuda_tests"]
    lines.append(f"CUDA tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
                 f"of {t['tests']}" if t["ran"] else "CUDA tests: did not run")
    lines += [f"- FAILED {f}" for f in t.get("failed", [])]
    tp = s["throughput"]
    if tp:
        inf = tp["inference"]
        lines += ["", f"Training ({tp['batch']} x {tp['size']} px): engine {tp['engine_img_per_s']:.1f} img/s, "
                  f"bare loop {tp['bare_img_per_s']:.1f} img/s (NCHW {tp['bare_nchw_img_per_s']:.1f}, channels-last "
                  f"{tp['bare_channels_last_img_per_s']:.1f}), ratio {tp['ratio']:.3f}",
                  f"Inference ({inf['images']} JPEG frames {inf['frame'][1]}x{inf['frame'][0]}): semiseg "
                  f"{inf['engine_img_per_s']:.1f} img/s, bare loop {inf['bare_img_per_s']:.1f} img/s, ratio "
                  f"{inf['ratio']:.3f}"]
    else:
        lines += ["", "Throughput: not measured"]
    lines += ["", "| polyp, split seed 0 | wall (s) | test Dice | CPU row test Dice | difference | CPU wall (s) |",
              "|---|---|---|---|---|---|"]

    def num(v: Any, f: str) -> str:
        return format(v, f) if isinstance(v, int | float) else "-"

    for r in s["polyp_seed0"]:
        diff = num(r.get("difference"), "+.3f")
        if "within_noise" in r:
            diff += " (within noise)" if r["within_noise"] else " (beyond noise)"
        lines.append(f"| {r['method']} | {num(r.get('wall_seconds'), '.0f') if r['finished'] else 'not finished'} | "
                     f"{num(r.get('test_dice'), '.3f')} | {num(r.get('cpu_test_dice'), '.3f')} | {diff} | "
                     f"{num(r.get('cpu_wall_seconds'), '.0f')} |")
    lines += ["", f"Noise band: +-{s['noise']:.3f} Dice (README: supervised trained twice moved by -3.3 to +2.9 "
              "points)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-results", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--device", required=True)
    args = parser.parse_args()
    summary = summarize(args.out, args.cpu_results, args.seconds, args.device)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "summary.md").write_text(markdown(summary))


if __name__ == "__main__":
    main()
