"""Predict with an exported model: onnxruntime + numpy + PIL/OpenCV, **no torch**.

This module imports only numpy, onnxruntime and semiseg's torch-free helpers (image decoding
:mod:`semiseg.data.decode`, the training-time resize :func:`semiseg.data.cache.resize_image`, folder listing,
prefetch, progress, the mask writer), so a deployment can run it without the training environment. The test
suite checks that by running it with ``torch`` made unimportable.

The exported graph takes ``B×3×H×W`` float32 RGB on ``[0, 1]`` (the input normalisation is inside it) and returns
logits ``B×C×H×W``. Everything around the graph mirrors :mod:`semiseg.evaluation.inference` in numpy, with the
settings the export recorded (``semiseg`` metadata in the ONNX file, also written beside it as JSON):

- ``resize``: the image resized to the working size exactly as training saw it (OpenCV area / bilinear), softmax,
  probabilities upsampled to the original size bilinearly with half-pixel centres (``align_corners=False``).
- ``whole``: native size, padded bottom/right to a multiple of ``size_divisor``.
- ``sliding_window``: windows of ``window`` every ``stride``, softmax summed and averaged per pixel.
- ``center_crop``: only the centre crop is predicted (class 0 elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.cache import resize_image
from semiseg.data.prefetch import group_batches
from semiseg.data.sources import list_images
from semiseg.deploy.metadata import PROTOCOLS, parse_metadata
from semiseg.deploy.outputs import Predicted, write_predictions
from semiseg.errors import ConfigError, SemisegError

METADATA_KEY = "semiseg"
INSTALL_HINT = "pip install 'semiseg[export]'  (or: pip install onnx onnxruntime)"


def import_onnxruntime() -> Any:
    """onnxruntime, or a SemisegError that says what to install."""
    try:
        import onnxruntime
    except ImportError as err:
        raise SemisegError(f"running an ONNX model needs onnxruntime, which is not installed: {INSTALL_HINT}") from err
    return onnxruntime


def sidecar_path(model_path: Path) -> Path:
    """``model.onnx`` -> ``model.json``: the human-readable copy of the embedded metadata."""
    return Path(model_path).with_suffix(".json")


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def _axis_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear resize along one axis (``align_corners=False``)."""
    # float32, as PyTorch's CPU kernel computes it (agrees with F.interpolate to ~2e-6)
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def bilinear_resize(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``C×h×w`` float32 to ``C×H×W`` as ``F.interpolate(mode="bilinear", align_corners=False)`` does."""
    if probs.shape[-2:] == tuple(size):
        return probs
    r0, r1, rw = _axis_taps(probs.shape[-2], size[0])
    c0, c1, cw = _axis_taps(probs.shape[-1], size[1])
    one = np.float32(1.0)
    cols = probs[:, :, c0] * (one - cw) + probs[:, :, c1] * cw  # along W first, then H, as PyTorch's kernel
    return cols[:, r0, :] * (one - rw)[:, None] + cols[:, r1, :] * rw[:, None]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``0..length``, the last one flush with the end (as the evaluator's)."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return sorted({min(i * stride, length - window) for i in range(n)})


class OnnxSegmenter:
    """An exported semiseg model with its preprocessing: ``probs(image)`` / ``run(items)`` like the
    PyTorch :class:`~semiseg.evaluation.batched.BatchPredictor`."""

    def __init__(self, model_path: Path, *, threads: int | None = None, protocol: str | None = None,
                 batch_size: int = 8) -> None:
        ort = import_onnxruntime()
        model_path = Path(model_path)
        if not model_path.is_file():
            raise ConfigError(f"{model_path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ConfigError(f"{model_path}: not a loadable ONNX model ({err})") from err
        self.meta = self._metadata(model_path)
        pre = self.meta["preprocessing"]
        self.protocol = protocol or pre["protocol"]
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol {self.protocol!r} unknown; choose one of {', '.join(PROTOCOLS)}")
        self.size = tuple(pre["size"])
        self.window = tuple(pre["window"] or self.size)
        self.stride = tuple(pre["stride"] or (max(1, self.window[0] * 2 // 3), max(1, self.window[1] * 2 // 3)))
        self.size_divisor = int(pre["size_divisor"])
        self.pad_mode = pre["pad_mode"]
        self.mean = np.array(self.meta["normalization"]["mean"], dtype=np.float32)
        self.classes = self.meta["classes"]
        self.batch_size = max(1, batch_size)
        self.input_name = self.session.get_inputs()[0].name

    def _metadata(self, model_path: Path) -> dict[str, Any]:
        text = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        where = model_path
        if text is None and sidecar_path(model_path).is_file():
            where = sidecar_path(model_path)
            try:
                text = where.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"{where}: unreadable ({err})") from None
        return parse_metadata(text, where)

    @property
    def palette(self) -> list[list[int]]:
        return self.classes["colors"]

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``B×C×H×W`` of uint8 images ``B×H×W×3``."""
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
        return softmax(self.session.run(None, {self.input_name: x})[0])

    def prepare(self, image: np.ndarray) -> np.ndarray | None:
        """Decode-thread work: the working-size copy for ``resize``."""
        return resize_image(image, *self.size) if self.protocol == "resize" else None

    def probs(self, image: np.ndarray) -> np.ndarray:
        """Probabilities ``C×H0×W0`` of one ``uint8 H0×W0×3`` image."""
        return next(self.run([(image, self.prepare(image), None)]))[1]

    def run(self, items: Iterable[tuple[np.ndarray, np.ndarray | None, Any]]) -> Iterator[tuple[Any, np.ndarray]]:
        """``(payload, probabilities C×H0×W0)`` for ``(image, prepare(image), payload)`` items, in order."""
        if self.protocol == "resize":
            for batch in group_batches(items, key=lambda it: None, size=lambda it: 1, max_items=self.batch_size):
                probs = self.forward(np.stack([p if p is not None else self.prepare(i) for i, p, _ in batch]))
                for k, (image, _, payload) in enumerate(batch):
                    yield payload, bilinear_resize(probs[k], image.shape[:2])
        elif self.protocol == "whole":
            for batch in group_batches(items, key=lambda it: it[0].shape, size=lambda it: 1,
                                       max_items=self.batch_size):
                h0, w0 = batch[0][0].shape[:2]
                d = self.size_divisor
                x = self._pad(np.stack([i for i, _, _ in batch]), -h0 % d, -w0 % d)
                probs = self.forward(x)[..., :h0, :w0]
                for k, (_, _, payload) in enumerate(batch):
                    yield payload, probs[k]
        else:
            for image, _, payload in items:
                yield payload, (self._sliding(image) if self.protocol == "sliding_window" else self._center(image))

    def _pad(self, x: np.ndarray, ph: int, pw: int) -> np.ndarray:
        """Pad ``B×H×W×3`` uint8 at the bottom/right as the evaluator pads (reflect, or the mean colour)."""
        ph, pw = max(ph, 0), max(pw, 0)
        if ph == 0 and pw == 0:
            return x
        widths = ((0, 0), (0, ph), (0, pw), (0, 0))
        if self.pad_mode == "zero":  # the model's mean colour: zero once normalised
            out = np.empty((x.shape[0], x.shape[1] + ph, x.shape[2] + pw, 3), dtype=np.float32)
            out[:] = self.mean * 255.0
            out[:, :x.shape[1], :x.shape[2]] = x
            return out
        fits = ph < x.shape[1] and pw < x.shape[2]
        return np.pad(x, widths, mode="reflect" if fits else "edge")

    def _sliding(self, image: np.ndarray) -> np.ndarray:
        (h0, w0), (wh, ww), (sh, sw) = image.shape[:2], self.window, self.stride
        xp = self._pad(image[None], wh - h0, ww - w0)[0]
        h, w = xp.shape[:2]
        boxes = [(t, s) for t in window_starts(h, wh, sh) for s in window_starts(w, ww, sw)]
        total, count = None, np.zeros((1, h, w), dtype=np.float32)
        for i in range(0, len(boxes), self.batch_size):
            chunk = boxes[i:i + self.batch_size]
            probs = self.forward(np.stack([xp[t:t + wh, s:s + ww] for t, s in chunk]))
            if total is None:
                total = np.zeros((probs.shape[1], h, w), dtype=np.float32)
            for k, (t, s) in enumerate(chunk):
                total[:, t:t + wh, s:s + ww] += probs[k]
                count[:, t:t + wh, s:s + ww] += 1
        return (total / count)[:, :h0, :w0]

    def _center(self, image: np.ndarray) -> np.ndarray:
        h0, w0 = image.shape[:2]
        ch, cw = min(self.size[0], h0), min(self.size[1], w0)
        top, left = (h0 - ch) // 2, (w0 - cw) // 2
        crop = self._pad(image[None, top:top + ch, left:left + cw], self.size[0] - ch, self.size[1] - cw)
        probs = self.forward(crop)[0]
        out = np.zeros((probs.shape[0], h0, w0), dtype=np.float32)
        out[:, top:top + ch, left:left + cw] = probs[:, :ch, :cw]
        return out


def predict_folder(model_path: Path, images: Path, out_dir: Path, *, protocol: str | None = None,
                   threads: int | None = None, batch_size: int = 8, progress: bool = True,
                   console: Any = None, log: Any = print) -> Predicted:
    """``semiseg predict model.onnx images/ out/``: the same ``masks/`` and ``overlays/`` as a run directory
    gives; unreadable images are skipped and listed in the result."""
    files = list(list_images(Path(images)).values())
    segmenter = OnnxSegmenter(model_path, threads=threads, protocol=protocol, batch_size=batch_size)
    return write_predictions(Path(out_dir), segmenter.palette, files, segmenter.run, segmenter.prepare,
                             lambda probs: probs.argmax(0).astype(np.uint8), batch_size=batch_size,
                             title="predict (onnx)", progress=progress, console=console)
