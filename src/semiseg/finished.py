"""Using a finished run: load its delivered model, evaluate it, predict with it (offered by :mod:`semiseg.api`).

``evaluate`` of the run's own data checks that data against the run's fingerprint; ``evaluate --data OTHER`` scores
another source and never reads the run's own data folder (it may have moved or be gone): the class table the model
was trained with comes from the fingerprint. Which rows a score belongs to (``split``, ``data``) travels with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from semiseg.data.classes import ClassTable
from semiseg.data.types import DataSource
from semiseg.deploy.outputs import Predicted
from semiseg.errors import CheckpointError, ConfigError
from semiseg.pipeline.context import RunContext
from semiseg.pipeline.integrity import FINGERPRINT

EVALUATE_SPLITS = ("labeled", "val", "test", "unlabeled")


def _recorded_source(run_dir: Path) -> DataSource | None:
    """A stand-in for the run's data holding only the class table its fingerprint recorded (None without one):
    enough to rebuild the model when other data is evaluated."""
    try:
        names = json.loads((run_dir / FINGERPRINT).read_text())["classes"]
        classes = ClassTable(tuple(names), foreground=1 if len(names) == 2 else None)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # check_run names an unreadable fingerprint; a missing one is refused or accepted there
    return DataSource(name="(the run's data, not read)", root=None, classes=classes, samples=[],
                      decode_mask=lambda path: None)  # type: ignore[arg-type,return-value]


def load_run(run_dir: Path, *, console: Any = None, check: tuple[str, ...] = (), accept_changed_data: bool = False,
             accept_missing_fingerprint: bool = False, own_data: bool = True, command: str = "use",
             log: Any = print) -> tuple[RunContext, torch.nn.Module]:
    """The context and delivered model of a finished run (its config checked against its fingerprint, and
    the data of the splits in ``check``). A model with non-finite weights is refused. ``own_data=False``: the
    run's data folder is not read (``ctx.source`` then holds only the recorded class table)."""
    from semiseg.methods.registry import get_method
    from semiseg.rundir import prepare, read_run_config

    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise ConfigError(f"{run_dir}: no finished run here (no results.json); train or resume it first")
    config = read_run_config(run_dir)
    if not torch.cuda.is_available():  # a run trained on a GPU is still usable here (a runtime key)
        config.train.device = "cpu"
    ctx = prepare(config, run_dir, console=console, fresh=False, check=check,
                  accept_changed_data=accept_changed_data, accept_missing_fingerprint=accept_missing_fingerprint,
                  command=command, log=log, source=None if own_data else _recorded_source(run_dir))
    model = get_method(config.method.name)(ctx, config.method).final_model()
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{run_dir}: the delivered model holds non-finite weights ({', '.join(bad[:3])}): "
                              "its training diverged and any score of it would be meaningless; train it again "
                              "(lower train.lr, set train.grad_clip)")
    return ctx, model.eval()


def evaluate(run_dir: Path, *, data: str | None = None, root: str | None = None, split: str = "test",
             protocol: str | None = None, window: tuple[int, int] | None = None,
             stride: tuple[int, int] | None = None, accept_changed_data: bool = False,
             accept_missing_fingerprint: bool = False, log: Any = print, progress: bool = True, console: Any = None,
             batch_size: int = 8) -> dict[str, Any]:
    """Evaluate a run's model on a split of its own data, or on another source (its ``split`` when the source
    prescribes one, else every labeled image). The result names what was scored: ``split`` (``all`` for every
    image of another source) and, with ``data``, the source. ``progress``: a bar with images/s and ETA (the
    command's setting; a run's ``train.progress`` is about training, not about this)."""
    from semiseg.data.presets import load_source
    from semiseg.evaluation.evaluator import evaluate_source
    from semiseg.progress import progress_bar

    if split not in EVALUATE_SPLITS:
        raise ConfigError(f"--split {split!r}: choose {', '.join(EVALUATE_SPLITS[:-1])} or {EVALUATE_SPLITS[-1]}")
    ctx, model = load_run(run_dir, check=(split,) if data is None else (), accept_changed_data=accept_changed_data,
                          accept_missing_fingerprint=accept_missing_fingerprint, own_data=data is None,
                          command="evaluate", log=log)
    cfg = ctx.config
    scored = split
    if data is None:
        source = ctx.source
        stems = getattr(ctx.splits, split)
    else:
        source = load_source(data, root)
        scored = split if source.fixed_splits.get(split) else "all"
        stems = source.fixed_splits.get(split) or [s.stem for s in source.samples]
    if source.classes.num_classes != ctx.classes.num_classes:
        raise ConfigError(f"--data {data}: {source.classes.num_classes} classes, the model has "
                          f"{ctx.classes.num_classes}")
    if not stems:
        raise ConfigError(f"{data or run_dir}: the {split} split is empty: nothing to evaluate")
    with progress_bar(f"evaluate {scored}", len(stems), enabled=progress, console=console) as update:
        res = evaluate_source(model, source, stems, protocol=protocol or cfg.eval.protocol,
                              size=tuple(cfg.data.size), window=window or cfg.eval.window,
                              stride=stride or cfg.eval.stride, device=ctx.device, progress=update,
                              batch_size=batch_size)
    return {"split": scored, **({"data": source.name} if data is not None else {}), **res.to_dict(),
            "headline": res.headline()}


def predict(run_dir: Path, images: Path, out_dir: Path, *, protocol: str | None = None, log: Any = print,
            progress: bool = True, console: Any = None, batch_size: int = 8) -> Predicted:
    """Write a PNG mask (class indices, palette) and an overlay for every image in ``images``.

    An image that cannot be read is skipped (and listed in the result); the others are still predicted.
    ``run_dir`` may also be a model exported by ``semiseg export`` (``.onnx``: predicted by onnxruntime through
    :mod:`semiseg.deploy.onnx_predict`, the same files)."""
    import numpy as np

    from semiseg.data.sources import list_images
    from semiseg.deploy.outputs import write_predictions
    from semiseg.evaluation.batched import BatchPredictor
    from semiseg.pipeline.preflight import check_output_dir

    files = list(list_images(Path(images)).values())  # before loading the model: a wrong folder fails fast
    out_dir = Path(out_dir)
    check_output_dir(out_dir, 0)
    if Path(run_dir).suffix == ".onnx":
        from semiseg.deploy.onnx_predict import predict_folder

        return predict_folder(Path(run_dir), images, out_dir, protocol=protocol, batch_size=batch_size,
                              progress=progress, console=console, log=log)
    ctx, model = load_run(run_dir, command="predict", log=log)
    cfg = ctx.config
    predictor = BatchPredictor(model, protocol=protocol or cfg.eval.protocol, size=tuple(cfg.data.size),
                               window=cfg.eval.window, stride=cfg.eval.stride, num_classes=ctx.classes.num_classes,
                               device=ctx.device, batch_size=batch_size)
    return write_predictions(out_dir, ctx.classes.palette(), files, predictor.run, predictor.prepare,
                             lambda pred: pred.labels().cpu().numpy().astype(np.uint8), batch_size=batch_size,
                             title="predict", progress=progress, console=console)
