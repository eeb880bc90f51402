"""The Python API behind the CLI: run, resume, evaluate, predict."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from semiseg.config import RunConfig, dump_config, load_config
from semiseg.data.presets import load_source
from semiseg.data.splits import Splits, make_splits
from semiseg.engine.checkpoint import atomic_write_text, seed_everything
from semiseg.engine.distributed import barrier, init_distributed, resolve_device
from semiseg.errors import ConfigError
from semiseg.methods.registry import get_method
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.stages import run_stages


def git_commit() -> str | None:
    """Short commit of the code that runs, ``-dirty`` when the package's own files have uncommitted changes
    (result files a bench rewrites do not count)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if changed else "") if head else None


def _splits_for(config: RunConfig, source: Any) -> Splits:
    if config.split.files:
        return Splits.read(Path(config.split.files))
    return make_splits(source, seed=config.split.seed, labeled=config.split.labeled, val=config.split.val,
                       test=config.split.test, fixed=source.fixed_splits, group_aware=config.split.group_aware)


def prepare(config: RunConfig, run_dir: Path, *, console: Any = None, fresh: bool) -> RunContext:
    """Load data and splits, create (or reopen) the run directory, set seeds and the device."""
    device = resolve_device(config.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    source = load_source(config.data.source, config.data.root, **config.data.options)
    if fresh:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run directory {run_dir} already exists: continue it with `semiseg resume {run_dir}` "
                              "or choose another name (--set name=...)")
        splits = _splits_for(config, source)
        if dist.is_main:
            _create_run_dir(run_dir, config, splits)
        barrier()
    else:
        splits = Splits.read(run_dir / "splits")
    seed_everything(config.seed)
    return RunContext(config, run_dir, source, splits, device, dist, console)


def _create_run_dir(run_dir: Path, config: RunConfig, splits: Splits) -> None:
    """Splits and config appear together or not at all: a kill mid-creation leaves no half run directory."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.creating-", dir=run_dir.parent))
    try:
        splits.write(tmp / "splits")
        atomic_write_text(tmp / "config.yaml", dump_config(config))
        if run_dir.exists():
            run_dir.rmdir()  # empty: checked by the caller
        os.rename(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # (a SIGKILL leaves a hidden .NAME.creating-* behind, nothing else)
        raise


def _execute(ctx: RunContext, log: Any) -> dict[str, Any]:
    t0 = time.time()
    method = get_method(ctx.config.method["name"])(ctx, ctx.config.method_options())
    stage_dirs = run_stages(ctx.run_dir, method.stages(), out_dir=ctx.run_dir.parent, dist=ctx.dist, log=log)
    results: dict[str, Any] = {}
    if ctx.dist.is_main:
        model = method.final_model()
        results = final_results(ctx, model, stage_dirs, time.time() - t0)
        atomic_write_text(ctx.run_dir / "results.json", json.dumps(results, indent=1))
    barrier()
    return results


def final_results(ctx: RunContext, model: torch.nn.Module, stage_dirs: list[Path], seconds: float) -> dict:
    """Val metrics at working size, test metrics at original resolution, timings, provenance."""
    from semiseg.evaluation.evaluator import evaluate_source
    from semiseg.pipeline.training import validation_fn

    cfg = ctx.config
    val = validation_fn(ctx)(model)
    test = None
    if ctx.splits.test:
        res = evaluate_source(model, ctx.source, ctx.splits.test, protocol=cfg.eval.protocol,
                              size=tuple(cfg.data.size), window=cfg.eval.window, stride=cfg.eval.stride,
                              device=ctx.device)
        test = res.to_dict()
        test["headline"] = res.headline()
    stages = []
    for d in stage_dirs:
        info = json.loads((d / "DONE").read_text()) if (d / "DONE").exists() else {}
        stages.append({"dir": d.name, **info})
    diagnostics = ctx.run_dir / "diagnostics.json"
    return {
        "pseudo_label_quality": last_pseudo_label_quality(stage_dirs, ctx.classes.is_binary),
        "diagnostics": json.loads(diagnostics.read_text()) if diagnostics.is_file() else None,
        "name": cfg.name, "method": cfg.method["name"], "split_seed": cfg.split.seed, "seed": cfg.seed,
        "val_metric": ctx.val_metric, "val": val, "test": test,
        "stage_seconds": round(sum(s.get("seconds", 0.0) for s in stages), 1),
        "session_seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stages": stages, "command": " ".join(["semiseg", *sys.argv[1:]]), "commit": git_commit(),
    }


def last_pseudo_label_quality(stage_dirs: list[Path], binary: bool) -> float | None:
    """Quality of the newest pseudo-label round against ground truth (benchmark mode), if any."""
    for d in reversed(stage_dirs):
        for stats_path in sorted(d.rglob("stats.json")):
            quality = json.loads(stats_path.read_text()).get("quality")
            if quality:
                return quality.get("foreground_dice" if binary else "miou")
    return None


def run(config: RunConfig, *, console: Any = None, log: Any = print) -> dict[str, Any]:
    """Train ``config``'s method from scratch in ``out_dir/name``; returns ``results.json``'s content."""
    run_dir = Path(config.out_dir) / config.name
    return _execute(prepare(config, run_dir, console=console, fresh=True), log)


def resume(run_dir: Path, *, console: Any = None, log: Any = print) -> dict[str, Any]:
    """Continue a killed or unfinished run: finished stages are skipped, the current one resumes."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml")
    return _execute(prepare(config, run_dir, console=console, fresh=False), log)


def load_run(run_dir: Path, *, console: Any = None) -> tuple[RunContext, torch.nn.Module]:
    """The context and delivered model of a finished run."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise ConfigError(f"{run_dir}: no finished run here (no results.json); train or resume it first")
    config = load_config(run_dir / "config.yaml")
    config.train.device = "cpu" if not torch.cuda.is_available() else config.train.device
    ctx = prepare(config, run_dir, console=console, fresh=False)
    model = get_method(config.method["name"])(ctx, config.method_options()).final_model()
    return ctx, model.eval()


def evaluate(run_dir: Path, *, data: str | None = None, root: str | None = None, split: str = "test",
             protocol: str | None = None, window: tuple[int, int] | None = None,
             stride: tuple[int, int] | None = None, progress: bool = True, console: Any = None,
             batch_size: int = 8) -> dict[str, Any]:
    """Evaluate a run's model on a split of its own data, or on every labeled image of another source.
    ``progress``: a bar with images/s and ETA (also off when the run's ``train.progress`` is false)."""
    from semiseg.evaluation.evaluator import evaluate_source
    from semiseg.progress import progress_bar

    ctx, model = load_run(run_dir)
    cfg = ctx.config
    if data is None:
        source = ctx.source
        if split not in ("labeled", "val", "test", "unlabeled"):
            raise ConfigError(f"--split {split!r}: choose labeled, val, test or unlabeled")
        stems = getattr(ctx.splits, split)
    else:
        source = load_source(data, root)
        stems = source.fixed_splits.get(split) or [s.stem for s in source.samples]
    if source.classes.num_classes != ctx.classes.num_classes:
        raise ConfigError(f"--data {data}: {source.classes.num_classes} classes, the model has "
                          f"{ctx.classes.num_classes}")
    with progress_bar("evaluate", len(stems), enabled=progress and cfg.train.progress, console=console) as update:
        res = evaluate_source(model, source, stems, protocol=protocol or cfg.eval.protocol,
                              size=tuple(cfg.data.size), window=window or cfg.eval.window,
                              stride=stride or cfg.eval.stride, device=ctx.device, progress=update,
                              batch_size=batch_size)
    out = res.to_dict()
    out["headline"] = res.headline()
    return out


def predict(run_dir: Path, images: Path, out_dir: Path, *, protocol: str | None = None, progress: bool = True,
            console: Any = None, batch_size: int = 8) -> int:
    """Write a PNG mask (class indices, palette) and an overlay for every image in ``images``.

    ``run_dir`` is a finished run directory or a model exported by ``semiseg export`` (``.onnx``: predicted by
    onnxruntime through :mod:`semiseg.deploy.onnx_predict`, the same files)."""
    import numpy as np

    from semiseg.data.decode import read_image
    from semiseg.data.prefetch import prefetch
    from semiseg.data.sources import list_images
    from semiseg.deploy.outputs import MaskWriter
    from semiseg.evaluation.batched import BatchPredictor
    from semiseg.progress import progress_bar

    if Path(run_dir).suffix == ".onnx":
        from semiseg.deploy.onnx_predict import predict_folder

        return predict_folder(Path(run_dir), images, out_dir, protocol=protocol, batch_size=batch_size,
                              progress=progress, console=console)
    ctx, model = load_run(run_dir)
    cfg = ctx.config
    files = list(list_images(Path(images)).values())
    predictor = BatchPredictor(model, protocol=protocol or cfg.eval.protocol, size=tuple(cfg.data.size),
                               window=cfg.eval.window, stride=cfg.eval.stride, num_classes=ctx.classes.num_classes,
                               device=ctx.device, batch_size=batch_size)

    def load(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[Path, np.ndarray]]:
        image = read_image(path)
        return image, predictor.prepare(image), (path, image)

    with MaskWriter(Path(out_dir), ctx.classes.palette()) as writer, \
            progress_bar("predict", len(files), enabled=progress and cfg.train.progress, console=console) as update:
        for k, ((path, image), pred) in enumerate(predictor.run(prefetch(load, files, depth=2 * batch_size))):
            writer.write(path.stem, image, pred.labels().cpu().numpy().astype(np.uint8))
            update(k + 1, len(files))
    return len(files)
