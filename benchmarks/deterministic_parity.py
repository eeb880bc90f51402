"""Deterministic parity: a refactor that must not change behaviour gives bit-identical test metrics.

Every method trains through the CLI (``python -m semiseg train CONFIG --set ...``, a subprocess with this
interpreter and this environment, so ``PYTHONPATH`` selects the code under test) on the built-in synthetic data
with one tiny, fully deterministic config (``CONFIG`` below: ``train.deterministic=true``, one thread, 64 px,
a 0.3 M-parameter network from scratch, 60 steps, staged methods shortened by ``METHOD_SETS``). Each method has
its own ``out_dir`` (no stage is reused from another method, so a subset gives the same numbers as the full
list); the synthetic data is generated into a private ``SEMISEG_CACHE`` in the run folder. Recorded per method:
the unrounded ``test`` and ``val`` dicts of ``results.json``, ``trained_steps``, ``pseudo_label_quality`` and
``diagnostics`` (the staged methods' per-round figures), and the sha256 of the delivered model's tensors
(``semiseg.api.load_run``: the model ``evaluate`` and ``export`` use); ``commit`` and ``seconds`` are provenance,
not compared. Two passes over the same code must compare identical; a pass over the old code and one over the
new code then show that the refactor changed nothing these runs exercise. From the repository root:

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/deterministic_parity.py --out before.json  # old commit
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/deterministic_parity.py --out after.json   # new commit
    python benchmarks/deterministic_parity.py --compare before.json after.json  # exit 1 if anything differs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["supervised", "st++", "dst-cbc", "atso", "mean-teacher", "gta-seg", "self-training", "stso",
           "self-learning", "momentum-pl", "fixmatch", "unimatch"]
CONFIG = {
    "seed": 0,
    "data": {"source": "synthetic", "options": {"kind": "binary", "n": 60, "size": 64, "seed": 0,
                                                "difficulty": "moderate"},
             "size": [64, 64], "benchmark_gt": True},
    "split": {"seed": 0, "labeled": 0.15, "val": 0.15, "test": 0.2},
    "model": {"arch": "Unet", "encoder": "tu-mobilenetv3_small_050", "weights": "none",
              "decoder_channels": [16, 8, 8], "options": {"encoder_depth": 3}},
    "train": {"steps": 60, "batch_size": 4, "eval_every": 15, "checkpoint_every": 15, "deterministic": True,
              "threads": 1, "num_workers": 0, "device": "cpu", "amp": "none", "progress": False,
              "augment": {"scale": [0.75, 1.25], "hflip": True, "vflip": True}},
}
STAGED = ["method.generations=1"]  # the ATSO family: one generation after the supervised model
METHOD_SETS = {"st++": ["method.retrain_scale=1"], "self-training": ["method.retrain_scale=1"],
               "dst-cbc": ["method.ratios=[0.5,1.0]"], "atso": STAGED, "stso": STAGED, "self-learning": STAGED}
HASH = """import hashlib, sys, torch
from semiseg.api import load_run
_, model = load_run(sys.argv[1], log=lambda *a, **k: None)
h = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def semiseg(args: list[str], env: dict[str, str], log: Path) -> str:
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(args)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}), see {log}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_method(method: str, root: Path, config: Path) -> dict:
    out = root / method
    env = {**os.environ, "SEMISEG_CACHE": str(root / "cache")}
    sets = [f"out_dir={out}", f"name={method}", f"method.name={method}", *METHOD_SETS.get(method, [])]
    t0 = time.time()
    semiseg(["-m", "semiseg", "train", str(config), *[a for s in sets for a in ("--set", s)]], env, out / "train.log")
    seconds = time.time() - t0
    results = json.loads((out / method / "results.json").read_text())
    digest = semiseg(["-c", HASH, str(out / method)], env, out / "hash.log").strip()
    keep = ("test", "val", "trained_steps", "pseudo_label_quality", "diagnostics")
    return {**{k: results.get(k) for k in keep}, "weights_sha256": digest, "seconds": round(seconds, 1),
            "commit": results.get("commit")}


def measure(methods: list[str], out: Path, out_dir: Path | None) -> None:
    root = Path(out_dir or tempfile.mkdtemp(prefix="semiseg-parity-"))
    root.mkdir(parents=True, exist_ok=True)
    config = root / "parity.yaml"
    config.write_text(json.dumps({"name": "parity", **CONFIG}, indent=1))  # JSON is YAML
    report = {"config": CONFIG, "method_sets": {m: METHOD_SETS.get(m, []) for m in methods}, "methods": {}}
    t0 = time.time()
    for method in methods:
        (root / method).mkdir(parents=True, exist_ok=False)
        report["methods"][method] = row = run_method(method, root, config)
        print(f"{method:14s} {row['seconds']:6.1f} s  test headline {row['test'].get('headline')!r}", flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if out_dir is None:  # a failed pass keeps its temporary folder (sys.exit above) for its logs
        shutil.rmtree(root)
    print(f"{len(methods)} methods in {report['seconds']} s -> {out}" + (f" (runs in {root})" if out_dir else ""))


def diff(a: object, b: object, key: str = "") -> list[str]:
    """Dotted keys whose values differ, with both values (floats compared exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{key}.{k}" if key else str(k))]
    return [] if a == b and type(a) is type(b) else [f"{key}: {a!r} != {b!r}"]


def compare(path_a: Path, path_b: Path) -> int:
    a, b = (json.loads(p.read_text()) for p in (path_a, path_b))
    commits = [{r.get("commit") for r in x["methods"].values()} for x in (a, b)]
    print(f"A: {path_a} (code {', '.join(map(str, commits[0]))})\nB: {path_b} (code {', '.join(map(str, commits[1]))})")
    bad = 0
    for line in diff(a["config"], b["config"]):
        print(f"WARNING: the runs used different configs: {line}")
    for method in [*a["methods"], *[m for m in b["methods"] if m not in a["methods"]]]:
        ma, mb = a["methods"].get(method), b["methods"].get(method)
        if ma is None or mb is None:
            print(f"{method}: only in {path_a if mb is None else path_b}")
            bad += 1
            continue
        info = ("seconds", "commit")  # provenance, not behaviour; the method's own --set options are compared
        lines = diff({"sets": a["method_sets"].get(method), **{k: v for k, v in ma.items() if k not in info}},
                     {"sets": b["method_sets"].get(method), **{k: v for k, v in mb.items() if k not in info}})
        print(f"{method}: identical" if not lines else f"{method}: DIFFERS in {len(lines)} keys")
        for line in lines:
            print(f"    {line}")
        bad += bool(lines)
    print("all identical" if not bad else f"{bad} methods differ")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", type=Path, default=Path("parity.json"), help="the JSON written")
    ap.add_argument("--out-dir", type=Path, help="run folders, kept (default: a temporary one, removed after success)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two JSONs; no training")
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    measure(args.methods, args.out, args.out_dir)


if __name__ == "__main__":
    main()
