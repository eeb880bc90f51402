"""``semiseg data inspect``: decode every file of a source once and report what a user must know.

The point is to find *all* problems in one pass (a corrupt JPEG, a mask of the wrong size, a value
outside the class table) before hours of training, instead of crashing on the first one.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from semiseg.data.decode import read_image
from semiseg.data.types import DataSource, Sample
from semiseg.errors import DataError


@dataclass
class InspectReport:
    """What ``inspect_source`` found. ``usable`` is False when there is any problem or no labeled image.

    ``mask_values`` counts decoded pixels per value (class index or 255); ``class_shares`` are
    fractions of the non-void labeled pixels. ``empty_masks`` lists stems whose mask has no pixel of
    an object class (all background, some void); ``void_masks`` those void everywhere (each a problem).
    ``problems`` holds at most ``max_problems`` entries;
    ``num_problems`` counts them all.
    """

    name: str
    root: str | None
    num_labeled: int = 0
    num_unlabeled: int = 0
    class_names: list[str] = field(default_factory=list)
    image_sizes: dict[tuple[int, int], int] = field(default_factory=dict)
    mask_values: dict[int, int] = field(default_factory=dict)
    class_shares: dict[str, float] = field(default_factory=dict)
    void_share: float = 0.0
    empty_masks: list[str] = field(default_factory=list)
    void_masks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    num_problems: int = 0
    seconds: float = 0.0
    usable: bool = False

    @property
    def min_size(self) -> tuple[int, int] | None:
        """Smallest height and smallest width over all images, as ``(H, W)``."""
        if not self.image_sizes:
            return None
        return min(h for h, _ in self.image_sizes), min(w for _, w in self.image_sizes)

    @property
    def max_size(self) -> tuple[int, int] | None:
        if not self.image_sizes:
            return None
        return max(h for h, _ in self.image_sizes), max(w for _, w in self.image_sizes)


def _background(source: DataSource) -> int | None:
    """The class that counts as 'nothing there' for the empty-mask report (None: every class is content)."""
    names = source.classes.names
    if source.classes.is_binary or names[0].lower() in ("background", "bg", "_background_"):
        return 0
    return None


def _check(source: DataSource, s: Sample) -> tuple[tuple[int, int] | None, np.ndarray | None, list[str]]:
    """Decode one sample: (image H, W or None, mask value counts or None, problems)."""
    problems: list[str] = []
    try:
        hw: tuple[int, int] | None = read_image(s.image).shape[:2]  # type: ignore[assignment]
    except DataError as e:
        hw = None
        problems.append(str(e))
    if s.mask is None:
        return hw, None, problems
    try:
        m = source.decode_mask(s.mask)
    except DataError as e:
        return hw, None, [*problems, str(e)]
    except Exception as e:  # a custom decoder's bug must not hide the rest of the report
        return hw, None, [*problems, f"{s.mask}: cannot decode mask ({type(e).__name__}: {e})"]
    if hw is not None and m.shape[:2] != hw:
        problems.append(f"{s.mask}: mask size {m.shape[0]}x{m.shape[1]} differs from image size "
                        f"{hw[0]}x{hw[1]} ({s.image.name}) (H x W)")
        return hw, None, problems
    return hw, np.bincount(m.ravel(), minlength=256), problems


def inspect_source(source: DataSource, *, max_problems: int = 50, workers: int | None = None) -> InspectReport:
    """Decode every image and mask of ``source`` and collect sizes, classes and every problem.

    Files are decoded by ``workers`` threads (default: up to 4, as many as CPUs; PIL decodes without
    the GIL); results are gathered in sample order, so the report does not depend on it.
    """
    t0 = time.perf_counter()
    rep = InspectReport(name=source.name, root=str(source.root) if source.root is not None else None,
                        num_labeled=len(source.samples), num_unlabeled=len(source.unlabeled),
                        class_names=list(source.classes.names))
    sizes: Counter[tuple[int, int]] = Counter()
    counts = np.zeros(256, dtype=np.int64)
    bg = _background(source)
    void = source.classes.ignore_index
    n_workers = workers or min(4, os.cpu_count() or 1)
    everything = [*source.samples, *source.unlabeled]
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = pool.map(lambda smp: _check(source, smp), everything)
        for i, (s, (hw, c, problems)) in enumerate(zip(everything, results, strict=True)):
            for p in problems:
                rep.num_problems += 1
                if len(rep.problems) < max_problems:
                    rep.problems.append(p)
            if hw is not None:
                sizes[hw] += 1
            if i < len(source.samples) and s.mask is None:
                rep.num_problems += 1
                if len(rep.problems) < max_problems:
                    rep.problems.append(f"{s.image}: labeled sample {s.stem!r} has no mask file")
            if c is None:
                continue
            counts += c
            if c[void] == c.sum():  # no labeled pixel: nothing to learn from, no score (training leaves it out)
                rep.void_masks.append(s.stem)
                rep.num_problems += 1
                if len(rep.problems) < max_problems:
                    rep.problems.append(f"{s.mask}: every pixel is void ({void}): the image has no label to learn "
                                        "from or score against; fix the mask or move the image to the unlabeled ones")
                continue
            objects = c[: source.classes.num_classes].copy()
            if bg is not None:
                objects[bg] = 0
            if objects.sum() == 0:
                rep.empty_masks.append(s.stem)

    rep.image_sizes = dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))
    rep.mask_values = {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
    total = int(counts.sum())
    labeled = total - int(counts[void])
    rep.void_share = counts[void] / total if total else 0.0
    rep.class_shares = {n: (float(counts[i]) / labeled if labeled else 0.0)
                        for i, n in enumerate(source.classes.names)}
    if not source.samples:
        rep.num_problems += 1
        rep.problems.append(f"{source.root}: no labeled images")
    rep.usable = rep.num_problems == 0
    rep.seconds = time.perf_counter() - t0
    return rep


def inspect_spec(spec: str | Path, root: str | Path | None = None, *, max_problems: int = 50,
                 **options: object) -> InspectReport:
    """Load ``spec`` (preset or folder) and inspect it; a loading error becomes an unusable report."""
    from semiseg.data.presets import load_source

    t0 = time.perf_counter()
    try:
        source = load_source(spec, root, **options)
    except DataError as e:
        rep = InspectReport(name=str(spec), root=str(root) if root is not None else None,
                            problems=[str(e)], num_problems=1, usable=False)
        rep.seconds = time.perf_counter() - t0
        return rep
    return inspect_source(source, max_problems=max_problems)


def _hw(size: tuple[int, int] | None) -> str:
    return "-" if size is None else f"{size[1]}x{size[0]}"


def render_report(report: InspectReport, console: Console, *, max_sizes: int = 8) -> None:
    """Print ``report`` as rich tables (sizes are shown as W x H, as image viewers do)."""
    head = Table(title=f"data: {report.name}", show_header=False)
    head.add_row("root", report.root or "-")
    head.add_row("labeled images", str(report.num_labeled))
    head.add_row("unlabeled images", str(report.num_unlabeled))
    head.add_row("distinct sizes (WxH)", f"{len(report.image_sizes)}  (min {_hw(report.min_size)}, "
                 f"max {_hw(report.max_size)})")
    head.add_row("empty masks", f"{len(report.empty_masks)}" + (
        f"  e.g. {', '.join(report.empty_masks[:3])}" if report.empty_masks else ""))
    head.add_row("void-only masks", f"{len(report.void_masks)}" + (
        f"  e.g. {', '.join(report.void_masks[:3])}" if report.void_masks else ""))
    head.add_row("void pixels", f"{100 * report.void_share:.2f} %")
    head.add_row("problems", str(report.num_problems))
    head.add_row("usable", "[green]yes[/green]" if report.usable else "[red]NO[/red]")
    head.add_row("inspect time", f"{report.seconds:.1f} s")
    console.print(head)

    if report.image_sizes:
        sizes = Table(title="image sizes")
        sizes.add_column("W x H")
        sizes.add_column("images", justify="right")
        for (h, w), n in list(report.image_sizes.items())[:max_sizes]:
            sizes.add_row(f"{w}x{h}", str(n))
        if len(report.image_sizes) > max_sizes:
            sizes.add_row("...", f"{sum(list(report.image_sizes.values())[max_sizes:])} more")
        console.print(sizes)

    if report.class_names:
        classes = Table(title="classes (share of labeled pixels)")
        for col, just in (("value", "right"), ("class", "left"), ("pixels", "right"), ("share", "right")):
            classes.add_column(col, justify=just)  # type: ignore[arg-type]
        for i, name in enumerate(report.class_names):
            classes.add_row(str(i), name, str(report.mask_values.get(i, 0)),
                            f"{100 * report.class_shares.get(name, 0.0):.2f} %")
        for v, n in report.mask_values.items():
            if v >= len(report.class_names):
                classes.add_row(str(v), "void", str(n), "-")
        console.print(classes)

    if report.problems:
        probs = Table(title=f"problems ({report.num_problems})", show_header=False)
        probs.add_column(overflow="fold")
        for p in report.problems:
            probs.add_row(p)
        if report.num_problems > len(report.problems):
            probs.add_row(f"... and {report.num_problems - len(report.problems)} more")
        console.print(probs)
