"""The pseudo-label store: one immutable directory per labelling round, written atomically.

Layout of ``root/<round>/``::

    stems.txt          one stem per line; line i names labels/<i>.png and confidence/<i>.png
    labels/<i>.png     uint8 class indices, 255 = not selected
    confidence/<i>.png confidence quantised to 0..255 (``round(c * 255)``)
    provenance.json    which model/checkpoint, policy (+ params), TTA, free-form extras
    stats.json         coverage, class shares, confidence, flip rate, GT quality (benchmark mode only)
    DONE               written last: a round without it does not exist

Files are named by position because stems may hold ``/`` or spaces (``kvasir-seg/abc 1``). A round is
built in a hidden sibling named with its writer, every file fsynced, ``DONE`` written last, and published whole
(``atomic.publish_directory``); an exception removes the temporary directory, and a killed writer's leftovers
(temporary directories of dead processes, round directories without ``DONE``) are removed by the next write.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from semiseg.atomic import fsync_dir, publish_directory, remove_stale_temporaries
from semiseg.data.classes import IGNORE_INDEX
from semiseg.errors import ConfigError, DataError
from semiseg.evaluation.metrics import ConfusionMatrix, ForegroundScores
from semiseg.layout import DONE, is_done

HIST_BINS = 20


# ------------------------------------------------------------------------------------------- files
def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode != "L":
                raise DataError(f"{path}: expected a single-channel uint8 PNG, found mode {im.mode}")
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read pseudo-label PNG ({e})") from e


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so stats.json is strict JSON."""
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.ndarray, np.integer)):
        return _json_safe(x.tolist())
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


# -------------------------------------------------------------------------------------- provenance
def state_dict_hash(model: torch.nn.Module | Mapping[str, Any]) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes, values), device-independent."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    h = hashlib.sha256()
    for key in sorted(state):
        v = state[key]
        h.update(key.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """SHA-256 of a file (a checkpoint), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_provenance(*, model: torch.nn.Module | None = None, checkpoint: Path | None = None,
                    policy: Any = None, labeler: Any = None, **extra: Any) -> dict[str, Any]:
    """A provenance dict: model hash, checkpoint path + hash, policy name/params, labeler TTA, extras."""
    prov: dict[str, Any] = {}
    if model is not None:
        prov["model_sha256"] = state_dict_hash(model)
    if checkpoint is not None:
        prov["checkpoint"] = {"path": str(checkpoint), "sha256": file_hash(Path(checkpoint))}
    if policy is not None:
        prov["policy"] = {"name": policy.name, "params": policy.params()}
    if labeler is not None:
        prov["tta"] = labeler.params()
    prov.update(extra)
    return prov


# ------------------------------------------------------------------------------------------- round
class PseudoRound:
    """A finished round, read back: stems, labels, confidences, provenance and stats."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = self.path.name
        if not is_done(self.path):
            raise DataError(f"{self.path}: not a finished pseudo-label round (no DONE marker)")
        try:
            self.stems: list[str] = (self.path / "stems.txt").read_text(encoding="utf-8").splitlines()
            self.provenance: dict[str, Any] = json.loads((self.path / "provenance.json").read_text("utf-8"))
            self.stats: dict[str, Any] = json.loads((self.path / "stats.json").read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: damaged pseudo-label round ({e})") from e
        self._index = {s: i for i, s in enumerate(self.stems)}

    def __len__(self) -> int:
        return len(self.stems)

    def __contains__(self, stem: object) -> bool:
        return stem in self._index

    def index(self, stem: str) -> int:
        try:
            return self._index[stem]
        except KeyError:
            raise DataError(f"{self.path}: no pseudo label for stem {stem!r}") from None

    def labels(self, stem: str) -> np.ndarray:
        """uint8 ``H×W`` class indices, 255 where the policy selected nothing."""
        return _read_png(self.path / "labels" / f"{self.index(stem)}.png")

    def confidence(self, stem: str) -> np.ndarray:
        """float32 ``H×W`` confidence in [0, 1] (quantised to 1/255)."""
        return _read_png(self.path / "confidence" / f"{self.index(stem)}.png").astype(np.float32) / 255.0

    def labels_array(self, stems: Sequence[str] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Labels of ``stems`` (default: all) stacked ``N×H×W`` uint8, into ``out`` (e.g. a memmap)."""
        stems = self.stems if stems is None else list(stems)
        for k, stem in enumerate(stems):
            a = self.labels(stem)
            if out is None:
                out = np.empty((len(stems), *a.shape), dtype=np.uint8)
            if a.shape != out.shape[1:]:
                raise DataError(f"{self.path}: {stem!r} is {a.shape}, not {out.shape[1:]}; cannot stack")
            out[k] = a
        return out if out is not None else np.empty((0, 0, 0), dtype=np.uint8)

    def __repr__(self) -> str:
        return f"PseudoRound({self.name!r}, {len(self)} images)"


# ------------------------------------------------------------------------------------------ writer
class RoundWriter:
    """Adds images to a round under construction and accumulates its statistics on the fly."""

    def __init__(self, tmp: Path, *, num_classes: int | None, previous: PseudoRound | None,
                 ground_truth: Callable[[str], np.ndarray] | None, foreground: int | None) -> None:
        self.tmp = tmp
        self.num_classes = num_classes
        self.previous = previous
        self.ground_truth = ground_truth
        self.stems: list[str] = []
        self._seen: set[str] = set()
        self._class_counts = np.zeros(256, dtype=np.int64)
        self._conf_sum = 0.0
        self._conf_sum_sel = 0.0
        self._hist = np.zeros(HIST_BINS, dtype=np.int64)
        self._flip_compared = 0
        self._flip_changed = 0
        self._flip_images = 0
        self._cm = ConfusionMatrix(num_classes) if ground_truth is not None and num_classes else None
        self._fg = ForegroundScores(foreground) if ground_truth is not None and foreground is not None \
            else None
        (tmp / "labels").mkdir(parents=True)
        (tmp / "confidence").mkdir()

    def add(self, stem: str, label: np.ndarray, confidence: np.ndarray) -> None:
        """Write one image's label (uint8 H×W, 255 = unselected) and confidence (float H×W in [0, 1])."""
        if not isinstance(stem, str) or not stem or "\n" in stem or "\r" in stem:
            raise DataError(f"pseudo-label stem {stem!r}: must be a non-empty single-line string")
        if stem in self._seen:
            raise DataError(f"pseudo-label stem {stem!r} added twice")
        label = np.asarray(label)
        conf = np.asarray(confidence, dtype=np.float64)
        if label.ndim != 2 or label.dtype != np.uint8:
            raise ValueError(f"{stem}: label must be a uint8 H×W array, got {label.dtype} {label.shape}")
        if conf.shape != label.shape:
            raise ValueError(f"{stem}: confidence shape {conf.shape} != label shape {label.shape}")
        if conf.size and (not np.isfinite(conf).all() or conf.min() < -1e-6 or conf.max() > 1 + 1e-6):
            raise ValueError(f"{stem}: confidence must be finite and in [0, 1]")
        conf = np.clip(conf, 0.0, 1.0)
        counts = np.bincount(label.ravel(), minlength=256)
        if self.num_classes is not None and counts[self.num_classes:IGNORE_INDEX].any():
            bad = int(np.flatnonzero(counts[self.num_classes:IGNORE_INDEX])[0]) + self.num_classes
            raise ValueError(f"{stem}: label {bad} outside 0..{self.num_classes - 1} and not 255")

        i = len(self.stems)
        _write_bytes(self.tmp / "labels" / f"{i}.png", _png_bytes(label))
        _write_bytes(self.tmp / "confidence" / f"{i}.png", _png_bytes(np.rint(conf * 255.0)))
        self.stems.append(stem)
        self._seen.add(stem)

        selected = label != IGNORE_INDEX
        self._class_counts += counts
        self._conf_sum += float(conf.sum())
        self._conf_sum_sel += float(conf[selected].sum())
        self._hist += np.histogram(conf, bins=HIST_BINS, range=(0.0, 1.0))[0]
        if self.previous is not None and stem in self.previous:
            prev = self.previous.labels(stem)
            if prev.shape == label.shape:
                both = selected & (prev != IGNORE_INDEX)
                self._flip_compared += int(both.sum())
                self._flip_changed += int((both & (prev != label)).sum())
                self._flip_images += 1
        if self.ground_truth is not None:
            self._score(stem, label)

    def _score(self, stem: str, label: np.ndarray) -> None:
        gt = np.asarray(self.ground_truth(stem))  # type: ignore[misc]
        if gt.shape != label.shape:
            raise DataError(f"ground truth of {stem!r} is {gt.shape}, pseudo label is {label.shape}")
        # score the labels the student will train on: pixels the policy left unselected are not scored
        target = np.where(label == IGNORE_INDEX, IGNORE_INDEX, gt).astype(np.uint8)
        pred = np.where(label == IGNORE_INDEX, 0, label).astype(np.uint8)
        if self._cm is not None:
            self._cm.update(pred, target)
        if self._fg is not None:
            self._fg.update(pred, target, stems=[stem])

    def stats(self) -> dict[str, Any]:
        counts = self._class_counts
        n_pix = int(counts.sum())
        n_sel = n_pix - int(counts[IGNORE_INDEX])
        c = self.num_classes
        if c is None:
            used = np.flatnonzero(counts[:IGNORE_INDEX])
            c = int(used[-1]) + 1 if used.size else 0
        class_pixels = counts[:c]
        out: dict[str, Any] = {
            "num_images": len(self.stems),
            "num_pixels": n_pix,
            "selected_pixels": n_sel,
            "coverage": n_sel / n_pix if n_pix else None,
            "class_pixels": class_pixels.tolist(),
            "class_share": (class_pixels / n_sel).tolist() if n_sel else [None] * c,
            "mean_confidence": self._conf_sum / n_pix if n_pix else None,
            "mean_confidence_selected": self._conf_sum_sel / n_sel if n_sel else None,
            "confidence_histogram": {"bin_edges": np.linspace(0.0, 1.0, HIST_BINS + 1).tolist(),
                                     "counts": self._hist.tolist()},
            "previous_round": self.previous.name if self.previous is not None else None,
            "flip_rate": None,
            "flip_compared_pixels": self._flip_compared,
            "flip_compared_images": self._flip_images,
            "quality": None,
        }
        if self.previous is not None and self._flip_compared:
            out["flip_rate"] = self._flip_changed / self._flip_compared
        if self.ground_truth is not None:
            q: dict[str, Any] = {"scored": "selected pixels only (label != 255 and ground truth != 255)"}
            if self._cm is not None:
                q.update(miou=self._cm.miou(), per_class_iou=self._cm.iou().tolist(),
                         pixel_accuracy=self._cm.pixel_accuracy(), scored_pixels=self._cm.total)
            if self._fg is not None:
                s = self._fg.summary()
                q.update(foreground_dice=s["dice"], foreground_iou=s["iou"],
                         foreground_dice_pooled=s["dice_pooled"])
            out["quality"] = q
        return _json_safe(out)


# ------------------------------------------------------------------------------------------- store
class PseudoLabelStore:
    """Rounds of pseudo labels under ``root``; only rounds with a ``DONE`` marker are visible."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _check_name(self, name: str) -> None:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ConfigError(f"pseudo-label round name {name!r}: no '/', '\\' or leading '.'")

    def rounds(self) -> list[str]:
        """Names of finished rounds, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and is_done(p))

    def has(self, name: str) -> bool:
        return is_done(self.root / name)

    def load(self, name: str) -> PseudoRound:
        self._check_name(name)
        path = self.root / name
        if not is_done(path):
            raise DataError(f"{path}: no finished pseudo-label round {name!r} (rounds: {self.rounds()})")
        return PseudoRound(path)

    def clean_stale(self) -> list[Path]:
        """Remove temporary directories of dead writers; return what was removed."""
        return remove_stale_temporaries(self.root, recursive=False) if self.root.is_dir() else []

    @contextmanager
    def writer(
        self,
        name: str,
        provenance: Mapping[str, Any],
        *,
        previous: str | PseudoRound | None = None,
        ground_truth: Callable[[str], np.ndarray] | None = None,
        num_classes: int | None = None,
        foreground: int | None = None,
        overwrite: bool = False,
    ) -> Iterator[RoundWriter]:
        """Build round ``name``: ``with store.writer(name, prov) as w: w.add(stem, label, conf)``.

        ``previous`` (a round or its name) enables the flip rate. ``ground_truth`` (benchmark mode only:
        stem -> uint8 mask) adds pseudo-label quality to the stats, which needs ``num_classes``;
        ``foreground`` (default 1 for two classes) adds per-image foreground Dice.
        """
        self._check_name(name)
        if ground_truth is not None and num_classes is None:
            raise ConfigError("pseudo-label store: ground-truth quality needs num_classes")
        if foreground is None and num_classes == 2:
            foreground = 1
        final = self.root / name
        if is_done(final) and not overwrite:
            raise FileExistsError(f"{final}: pseudo-label round {name!r} already exists")
        prev = self.load(previous) if isinstance(previous, str) else previous
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        # a DONE-less round (a killed commit's, or one being overwritten) is replaced when the new one is whole
        with publish_directory(final) as tmp:
            w = RoundWriter(tmp, num_classes=num_classes, previous=prev, ground_truth=ground_truth,
                            foreground=foreground)
            yield w
            self._commit(w, dict(provenance))

    def _commit(self, w: RoundWriter, provenance: dict[str, Any]) -> None:
        """The round's index and records, every file fsynced, DONE last (the folder is then published)."""
        tmp = w.tmp
        _write_bytes(tmp / "stems.txt", "".join(s + "\n" for s in w.stems).encode("utf-8"))
        prov = _json_safe({"format": "semiseg-pseudo-round/1", **provenance})
        _write_bytes(tmp / "provenance.json", json.dumps(prov, indent=2, sort_keys=True).encode("utf-8"))
        _write_bytes(tmp / "stats.json", json.dumps(w.stats(), indent=2, allow_nan=False).encode("utf-8"))
        for d in (tmp / "labels", tmp / "confidence"):
            fsync_dir(d)
        _write_bytes(tmp / DONE, b"done\n")
