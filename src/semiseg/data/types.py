"""Plain records shared by the data layer: a sample and a data source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semiseg.data.classes import ClassTable


@dataclass(frozen=True)
class Sample:
    """One image, with its mask when it has one.

    ``stem`` is unique within a source and is what split files list. ``group`` ties samples that must
    never be split apart (frames of one video sequence); ``subset`` names the part of a combined source
    (``kvasir-seg`` / ``cvc-clinicdb`` in ``polyp``) so that metrics can be reported per test set.
    """

    stem: str
    image: Path
    mask: Path | None = None
    group: str | None = None
    subset: str | None = None


MaskDecoder = Callable[[Path], np.ndarray]


@dataclass
class DataSource:
    """A dataset as the rest of semiseg sees it.

    ``samples`` have masks; ``unlabeled`` are images that have none at all. ``decode_mask`` turns a
    mask file into a uint8 H×W array of class indices with 255 for void, checked against ``classes``.
    ``fixed_splits`` are splits the preset prescribes (e.g. ``{"test": [...stems]}`` for CamVid's
    official val frames, or the committed benchmark test split).
    """

    name: str
    root: Path | None
    classes: ClassTable
    samples: list[Sample]
    decode_mask: MaskDecoder
    unlabeled: list[Sample] = field(default_factory=list)
    fixed_splits: dict[str, list[str]] = field(default_factory=dict)

    def by_stem(self) -> dict[str, Sample]:
        return {s.stem: s for s in [*self.samples, *self.unlabeled]}
