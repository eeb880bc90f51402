"""``semiseg export RUN_DIR``: the run's delivered model as ONNX, with its preprocessing, checked against PyTorch.

The network is the one ``evaluate`` scores (:func:`semiseg.api.load_run`: the method's final model, e.g. the
student or the EMA teacher a method delivers). It carries its input normalisation as a forward pre-hook, so the
traced graph includes it: the ONNX input is ``B×3×H×W`` float32 RGB on ``[0, 1]``, the output logits
``B×C×H×W``; batch, height and width are dynamic. The preprocessing the model was trained and evaluated with
(protocol, working size, window, padding, normalisation, class table) is embedded as ONNX metadata under the key
``semiseg`` and written beside the model as ``<name>.json`` for a deployment to read.

Parity: before anything appears at ``--out``, onnxruntime predicts a few of the run's own test images through the
deploy path (:mod:`semiseg.deploy.onnx_predict`) and PyTorch through the evaluator's; the largest absolute
difference of the probabilities must be at most ``tolerance``, or the export fails and writes nothing.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semiseg.atomic import atomic_path, atomic_write_text, remove_stale_temporaries
from semiseg.data.decode import read_image
from semiseg.deploy.onnx_predict import INSTALL_HINT, METADATA_KEY, OnnxSegmenter, sidecar_path
from semiseg.errors import ConfigError, SemisegError, output_error
from semiseg.pipeline.preflight import check_writable_file

FORMATS = ("onnx",)
OPSET = 17
TOLERANCE = 1e-3  # max |p_onnx - p_torch|: float32 kernels differ by ~1e-6; a real mismatch is orders larger
CHECK_IMAGES = 4


@dataclass
class Parity:
    """How the exported model's probabilities compare with PyTorch's on real images."""

    images: int
    pixels: int
    max_abs_diff: float
    class_differs_share: float
    tolerance: float
    ok: bool

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"parity on {self.images} test images ({self.pixels:,} pixels): max |p_onnx - p_torch| = "
                f"{self.max_abs_diff:.2e}, class differs at {100 * self.class_differs_share:.4f}% of pixels "
                f"(tolerance: max |Δp| <= {self.tolerance:.0e}): {verdict}")


def _require_export_deps() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise SemisegError(f"export needs onnx and onnxruntime ({err.name} is missing): {INSTALL_HINT}") from err
    return onnx, onnxruntime


def metadata(ctx: Any, opset: int) -> dict[str, Any]:
    """What a deployment needs to feed the graph and read its output (all from the run's resolved config)."""
    from semiseg.provenance import git_commit

    cfg = ctx.config
    norm = cfg.model.input_normalization()
    classes = ctx.classes
    results = json.loads((ctx.run_dir / "results.json").read_text())
    return {
        "format": "semiseg-onnx", "version": 1, "opset": opset,
        "input": {"name": "image", "shape": ["batch", 3, "height", "width"], "dtype": "float32",
                  "range": [0.0, 1.0], "color": "RGB", "layout": "NCHW"},
        "output": {"name": "logits", "shape": ["batch", len(classes.names), "height", "width"],
                   "note": "softmax over axis 1 gives the probabilities; argmax the class index"},
        "normalization": {"mean": list(norm.mean), "std": list(norm.std), "applied_in_graph": True,
                          "note": "(x - mean) / std is part of the graph: feed [0, 1] RGB"},
        "preprocessing": {"protocol": cfg.eval.protocol, "size": list(cfg.data.size),
                          "window": list(cfg.eval.window) if cfg.eval.window else None,
                          "stride": list(cfg.eval.stride) if cfg.eval.stride else None,
                          "size_divisor": 32, "pad_mode": "reflect",
                          "resize": "OpenCV INTER_AREA when shrinking both sides, else INTER_LINEAR (uint8)",
                          "upsample": "probabilities, bilinear, half-pixel centres (align_corners=False)"},
        "classes": {"names": list(classes.names), "colors": [list(c) for c in classes.palette()],
                    "foreground": classes.foreground, "ignore_index": classes.ignore_index},
        "run": {"name": cfg.name, "method": cfg.method.name, "arch": cfg.model.arch, "encoder": cfg.model.encoder,
                "test_headline": (results.get("test") or {}).get("headline"), "trained_commit": results.get("commit")},
        "exported_with": {"semiseg_commit": git_commit(), "torch": torch.__version__},
    }


def to_onnx_bytes(model: torch.nn.Module, size: tuple[int, int], opset: int) -> bytes:
    """Trace ``model`` (its normalisation hook included) into ONNX with dynamic batch, height and width."""
    example = torch.rand(1, 3, *size)
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and constant-tensor notes
        warnings.simplefilter("ignore")
        # dynamo=False: the torch.export-based exporter needs onnxscript, an extra dependency; the traced
        # graph of an smp model is the same
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": axes, "logits": axes},
                          do_constant_folding=True)
    return buffer.getvalue()


def check_parity(model: torch.nn.Module, segmenter: OnnxSegmenter, images: list[np.ndarray], ctx: Any,
                 tolerance: float) -> Parity:
    """Evaluator (PyTorch) vs deploy path (onnxruntime) probabilities on ``images``, at original size."""
    from semiseg.evaluation.inference import predict_probs

    cfg = ctx.config
    worst, differ, pixels = 0.0, 0, 0
    onnx_probs = [p for _, p in segmenter.run((im, segmenter.prepare(im), None) for im in images)]
    for image, theirs in zip(images, onnx_probs, strict=True):
        ours = predict_probs(model, image, protocol=cfg.eval.protocol, size=tuple(cfg.data.size),
                             window=cfg.eval.window, stride=cfg.eval.stride, num_classes=ctx.classes.num_classes,
                             device="cpu").probs.cpu().numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
        differ += int((ours.argmax(0) != theirs.argmax(0)).sum())
        pixels += ours.shape[1] * ours.shape[2]
    return Parity(len(images), pixels, worst, differ / max(pixels, 1), tolerance, worst <= tolerance)


def _check_images(ctx: Any, n: int) -> list[np.ndarray]:
    stems = list(ctx.splits.test or ctx.splits.val)[:n]
    if not stems:
        raise ConfigError(f"{ctx.run_dir}: no test or validation images to check the export against")
    by_stem = ctx.source.by_stem()
    return [read_image(by_stem[s].image) for s in stems]


def export_run(run_dir: Path, out: Path | None = None, *, fmt: str = "onnx", opset: int = OPSET,
               tolerance: float = TOLERANCE, check_images: int = CHECK_IMAGES,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export the delivered model of the finished run ``run_dir`` to ``out`` (default ``RUN_DIR/model.onnx``)
    plus ``out`` with ``.json``; returns the metadata (with the parity figures). Raises SemisegError, leaving
    nothing at ``out``, when the run is not finished, a dependency is missing or parity fails."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: supported: {', '.join(FORMATS)}")
    onnx, onnxruntime = _require_export_deps()
    from semiseg.api import load_run

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "model.onnx"
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: the file name must end in .onnx")
    ctx, model = load_run(run_dir)  # first: a directory that is not a finished run leaves nothing behind
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(out, err) from None
    check_writable_file(out, "--out")  # before the tracing and the parity check, not after them
    remove_stale_temporaries(out.parent, recursive=False)  # an export killed before (its run dir: load_run did)
    model = model.to("cpu").eval()
    meta = metadata(ctx, opset)
    meta["exported_with"].update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    proto = onnx.load_from_string(to_onnx_bytes(model, tuple(ctx.config.data.size), opset))
    sidecar, replaced = sidecar_path(out), out.exists()
    try:
        # mkstemp's 0600 is for secrets; a model is meant to be copied around
        with atomic_path(out, mode=0o644) as tmp:
            onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
            parity = check_parity(model, OnnxSegmenter(tmp), _check_images(ctx, check_images), ctx, tolerance)
            log(parity.describe())
            if not parity.ok:
                raise SemisegError(f"export of {run_dir} failed its parity check: onnxruntime and PyTorch differ "
                                   f"by {parity.max_abs_diff:.2e} > {tolerance:.0e}; nothing written to {out}")
            meta["parity"] = asdict(parity)
            onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(meta)})
            onnx.save(proto, str(tmp))
            # the sidecar first: a model file never appears without its preprocessing (the model is renamed
            # into place when the block ends)
            atomic_write_text(sidecar, json.dumps(meta, indent=1) + "\n")
    except BaseException as err:
        if not replaced and not out.exists():
            sidecar.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise output_error(out, err) from None
        raise
    return {**meta, "path": str(out)}
