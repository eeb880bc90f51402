"""What ``predict`` writes per image — a palette PNG of class indices and a JPEG overlay — for both the run
directory (PyTorch) and the ONNX (onnxruntime) path, so the two produce the same files. numpy + PIL only.

Encoding a full-HD PNG and JPEG costs about as much as a small model's forward pass, so :class:`MaskWriter`
writes on a background thread while the next batch is predicted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from semiseg.atomic import atomic_path


def save_atomic(image: Image.Image, path: Path) -> None:
    """Write to a hidden temporary name in the same folder, then rename: no half-written file at ``path``."""
    with atomic_path(path, mode=0o644) as tmp:  # the temporary name keeps the suffix PIL picks the format by
        image.save(tmp)


class MaskWriter:
    """``out_dir/masks/<stem>.png`` (mode P, the class table's palette) and ``out_dir/overlays/<stem>.jpg``."""

    def __init__(self, out_dir: Path, palette: Sequence[Sequence[int]], *, max_pending: int = 8) -> None:
        self.out_dir = Path(out_dir)
        (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
        (self.out_dir / "overlays").mkdir(parents=True, exist_ok=True)
        self.palette = np.array(palette, dtype=np.uint8).reshape(-1, 3)
        self.flat_palette = self.palette.flatten().tolist() + [0] * (768 - self.palette.size)
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semiseg-write")
        self._pending: deque[Future[None]] = deque()

    def write(self, stem: str, image: np.ndarray, label: np.ndarray) -> None:
        """Queue the mask and overlay of one image (``label``: ``uint8 H×W`` class indices)."""
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()  # bounded memory; a failed write raises here
        self._pending.append(self._pool.submit(self._write, stem, image, label))

    def _write(self, stem: str, image: np.ndarray, label: np.ndarray) -> None:
        mask = Image.fromarray(label, mode="P")
        mask.putpalette(self.flat_palette)
        save_atomic(mask, self.out_dir / "masks" / f"{stem}.png")
        overlay = (0.55 * image + 0.45 * self.palette[label]).astype(np.uint8)
        overlay[label == 0] = image[label == 0]
        save_atomic(Image.fromarray(overlay), self.out_dir / "overlays" / f"{stem}.jpg")

    def close(self) -> None:
        """Wait for every queued write (raising the first failure)."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class Predicted:
    """What ``predict`` did: the images it wrote a mask and overlay for, and the files it skipped (why)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def read_or_skip(path: Path) -> tuple[np.ndarray | None, str | None]:
    """``(image, None)``, or ``(None, why)`` for a file that cannot be decoded: ``predict`` goes on without it."""
    from semiseg.data.decode import read_image
    from semiseg.errors import DataError

    try:
        return read_image(path), None
    except DataError as err:
        return None, str(err).removeprefix(f"{path}: ")


def loader(prepare: Callable[[np.ndarray], Any]) -> Callable[[Path], tuple[np.ndarray | None, Any, tuple[Path, Any]]]:
    """``load(path) -> (image, prepare(image), (path, image))`` for a prefetch stream, or ``(None, None, (path,
    why))`` for a file that cannot be decoded (see :func:`readable`)."""

    def load(path: Path) -> tuple[np.ndarray | None, Any, tuple[Path, Any]]:
        image, why = read_or_skip(path)
        if image is None:
            return None, None, (path, why)
        return image, prepare(image), (path, image)

    return load


def readable(items: Iterable[tuple[np.ndarray | None, Any, tuple[Path, Any]]], done: Predicted
             ) -> Iterator[tuple[np.ndarray, Any, tuple[Path, Any]]]:
    """The decoded items of a prefetch stream; unreadable ones (image None, payload ``(path, why)``) are recorded
    in ``done.skipped`` instead."""
    for image, prepared, payload in items:
        if image is None:
            done.skipped.append(payload)
        else:
            yield image, prepared, payload


def write_predictions(out_dir: Path, palette: Sequence[Sequence[int]], files: Sequence[Path],
                      run: Callable[[Iterable[tuple[np.ndarray, Any, tuple[Path, Any]]]], Iterable[tuple[Any, Any]]],
                      prepare: Callable[[np.ndarray], Any], labels: Callable[[Any], np.ndarray], *,
                      batch_size: int, title: str, progress: bool, console: Any = None) -> Predicted:
    """``predict``'s loop for either backend: decode ahead (unreadable files skipped and listed), ``run`` the
    predictor over the stream, write each image's ``labels(prediction)`` (uint8 ``H×W``) as mask and overlay.
    A write that fails for where it goes (disk full, read-only) is one :class:`OutputError` saying how far it got."""
    from semiseg.data.prefetch import prefetch
    from semiseg.errors import OUTPUT_ERRNOS, OutputError, output_error
    from semiseg.progress import progress_bar

    done = Predicted()
    try:
        with MaskWriter(out_dir, palette) as writer, \
                progress_bar(title, len(files), enabled=progress, console=console) as update:
            stream = readable(prefetch(loader(prepare), files, depth=2 * batch_size), done)
            for (path, image), prediction in run(stream):
                writer.write(path.stem, image, labels(prediction))
                done.written.append(path)
                update(len(done.written) + len(done.skipped), len(files))
    except (OSError, OutputError) as err:
        if isinstance(err, OSError) and err.errno not in OUTPUT_ERRNOS:
            raise
        failed = output_error(Path(out_dir) / "masks", err) if isinstance(err, OSError) else err
        raise OutputError(f"{failed}; at most {len(done.written)} of {len(files)} images were written before") from None
    return done
