"""The GPU paths, on a GPU (`pytest -m cuda`; skipped where PyTorch sees none, e.g. every CI and team machine).

Every method family trains a few steps on CUDA under fp16 AMP (with the gradient scaler) and under bf16 (without
one); a SIGKILLed CUDA run resumes and finishes; a CUDA-trained run is evaluated, predicts and exports (parity
check included); torchrun with one process runs NCCL and SyncBatchNorm; and a short deterministic run delivers the
same metrics on CPU and CUDA within a stated tolerance. `benchmarks/gpu_check.sh` runs these on a GPU machine.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cli_helpers import env, semiseg

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU visible to PyTorch: these run on a GPU machine "
                                        "(pytest -m cuda, or benchmarks/gpu_check.sh)")]

# the default model (pretrained Lite0 encoder, the one users train) with a narrow decoder, at 64 px
GPU_TINY = ["data.size=[64,64]", "data.options.n=48", "model.decoder_channels=[16,16,16,8,8]", "train.batch_size=4",
            "train.progress=false", "split.labeled=0.25", "split.val=0.2", "split.test=0.2", "train.device=cuda",
            "train.steps=8", "train.eval_every=4", "train.checkpoint_every=4"]
# one method per family module, with options that keep staged methods to a few short stages
FAMILIES: dict[str, dict[str, Any]] = {
    "supervised": {},
    "mean-teacher": {},
    "momentum-pl": {},
    "st++": {"retrain_steps": 4},
    "dst-cbc": {"ratios": [0.5, 1.0], "round_steps": 4},
    "atso": {"generations": 2, "generation_steps": 4},
    "gta-seg": {},
    "fixmatch": {},
    "unimatch": {},
}
# CPU vs CUDA after 20 deterministic fp32 steps: cuDNN's TF32 convolutions and other kernels round differently
# from the CPU's, and 20 optimizer steps carry that into the weights; the delivered Dice may differ this much
CPU_CUDA_DICE_TOLERANCE = 0.02


def sets(items: list[str]) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def run_in_process(tmp_path: Path, name: str, extra: list[str], method: dict[str, Any]) -> dict[str, Any]:
    from semiseg.api import load_config, run

    overrides = [*GPU_TINY, f"name={name}", f"out_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
                 *extra, *[f"method.{k}={json.dumps(v)}" for k, v in method.items()]]
    return run(load_config(None, overrides), log=lambda *a, **k: None)


def checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    found = sorted((run_dir / "stages").glob("*/checkpoints/last.pt"))
    assert found, f"no training stage checkpointed in {run_dir}"
    return [torch.load(p, map_location="cpu", weights_only=True) for p in found]


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_family_trains_on_cuda(tmp_path, family, amp) -> None:
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    results = run_in_process(tmp_path, family, [f"train.amp={amp}"], {"name": family, **FAMILIES[family]})
    assert all(math.isfinite(results[split][m]) for split in ("val", "test") for m in ("dice", "iou", "miou"))
    for state in checkpoints(tmp_path / "runs" / family):
        for net, weights in state["nets"].items():  # students, teachers, EMA copies: all finite
            assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point()), net
        for scaler in state["scalers"].values():
            if amp == "fp16":  # fp16 gradients are scaled, and the scale is part of the resumable state
                assert scaler["scale"] > 0 and math.isfinite(scaler["scale"])
            else:  # bf16 has fp32's range: nothing is scaled
                assert scaler == {}
        assert "cuda" in state["rng"]


def _log(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "stages" / stage / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_on_cuda(tmp_path) -> None:
    # 200 steps: a GPU runs the ~180 left after the kill point in seconds, so the kill lands inside training
    extra = [*GPU_TINY, "method.name=mean-teacher", "train.amp=fp16", "train.deterministic=true", "train.steps=200",
             "train.eval_every=100", "train.checkpoint_every=10"]
    out = tmp_path / "runs"
    semiseg(["train", *sets([*extra, "name=straight", f"out_dir={out}"])], tmp_path)
    cmd = [sys.executable, "-m", "semiseg", "train", *sets([*extra, "name=killed", f"out_dir={out}"])]
    proc = subprocess.Popen(cmd, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = out / "killed" / "stages" / "0-mean-teacher" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and '"step": 20' in metrics.read_text():
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(metrics.parent / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert 20 <= killed_at["step"] < 200 and killed_at["scalers"]["model"]["scale"] > 0
    before = [r for r in _log(out / "killed", "0-mean-teacher") if r["step"] <= killed_at["step"]]
    semiseg(["resume", str(out / "killed")], tmp_path)
    final = torch.load(metrics.parent / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert final["step"] == 200
    straight, resumed = _log(out / "straight", "0-mean-teacher"), _log(out / "killed", "0-mean-teacher")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # the log continues, no step twice
    assert resumed[:len(before)] == before  # what the killed process logged up to its checkpoint is kept
    # CUDA kernels with atomics (the loss's reduction, some backward passes) are not bit-exact even in
    # deterministic mode, so the resumed run follows the unbroken one closely rather than exactly; a resume that
    # lost the weights, the EMA teacher, the optimizer or the schedule would leave this band
    for a, b in zip(straight, resumed, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=0.1, abs=0.02), a["step"]
    ra, rb = (json.loads((out / n / "results.json").read_text()) for n in ("straight", "killed"))
    assert abs(ra["test"]["dice"] - rb["test"]["dice"]) <= CPU_CUDA_DICE_TOLERANCE


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cuda-run")
    semiseg(["train", *sets([*GPU_TINY, "train.amp=fp16", "name=sup", f"out_dir={tmp / 'runs'}"])], tmp)
    return tmp, tmp / "runs" / "sup"


def test_a_cuda_trained_run_evaluates_predicts_and_exports(cuda_run) -> None:
    pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'semiseg[export]'")
    tmp, run = cuda_run
    semiseg(["evaluate", str(run), "--split", "test", "--json", str(tmp / "eval.json"), "--no-progress"], tmp)
    evaluated = json.loads((tmp / "eval.json").read_text())
    delivered = json.loads((run / "results.json").read_text())["test"]
    assert evaluated["dice"] == pytest.approx(delivered["dice"], abs=1e-4)  # the same network, the same protocol
    images = tmp / "images"
    images.mkdir()
    from PIL import Image

    for i, size in enumerate([(64, 64), (90, 120)]):
        Image.new("RGB", size[::-1], (150 + 30 * i, 80, 70)).save(images / f"img{i}.png")
    semiseg(["predict", str(run), str(images), str(tmp / "pred")], tmp)
    assert sorted(p.name for p in (tmp / "pred" / "masks").iterdir()) == ["img0.png", "img1.png"]
    proc = semiseg(["export", str(run)], tmp)  # traced and checked on the CPU from the CUDA-trained weights
    assert ": ok" in " ".join(proc.stderr.split())
    meta = json.loads((run / "model.json").read_text())
    assert meta["parity"]["ok"] and meta["parity"]["max_abs_diff"] <= meta["parity"]["tolerance"]


def test_torchrun_one_process_nccl_with_sync_bn(tmp_path) -> None:
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "semiseg",
           "train", *sets([*GPU_TINY, "method.name=mean-teacher", "train.sync_bn=true", "name=ddp",
                           f"out_dir={out}"])]
    proc = subprocess.run(cmd, env=env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((out / "ddp" / "results.json").read_text())
    assert math.isfinite(results["test"]["dice"])
    # SyncBatchNorm keeps BatchNorm's state-dict keys: the checkpoint serves evaluate without torchrun
    semiseg(["evaluate", str(out / "ddp"), "--split", "val", "--no-progress"], tmp_path)


def test_under_a_process_group_the_loop_wraps_ddp_and_sync_bn(tmp_path) -> None:
    import torch.distributed as dist

    from semiseg.config import TrainConfig
    from semiseg.engine.distributed import DistInfo
    from semiseg.engine.loader import EndlessLoader
    from semiseg.engine.trainer import Trainer
    from semiseg.methods.supervised import SupervisedTask
    from tests.engine_helpers import data

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                  torch.nn.Conv2d(8, 2, 1))
        task = SupervisedTask(net, EndlessLoader(data(), 4, seed=0, pin_memory=True))
        train = TrainConfig(steps=4, batch_size=4, sync_bn=True, progress=False, eval_every=4, checkpoint_every=4)
        trainer = Trainer(task, train, tmp_path, device=torch.device("cuda", 0), dist=DistInfo(joined=True))
        wrapped = trainer.task.nets["model"]
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in wrapped.modules())
        assert trainer.fit().steps == 4
    finally:
        dist.destroy_process_group()


def test_cpu_and_cuda_deliver_the_same_metrics(tmp_path) -> None:
    """A short deterministic fp32 run: the CPU's and the GPU's delivered Dice agree within the tolerance."""
    extra = ["train.amp=none", "train.deterministic=true", "train.steps=20", "train.eval_every=10"]
    method = {"name": "supervised"}
    on_gpu = run_in_process(tmp_path / "gpu", "cuda", extra, method)
    on_cpu = run_in_process(tmp_path / "cpu", "cpu", [*extra, "train.device=cpu"], method)
    for split in ("val", "test"):
        for metric in ("dice", "iou"):
            assert abs(on_gpu[split][metric] - on_cpu[split][metric]) <= CPU_CUDA_DICE_TOLERANCE, (split, metric)
