"""``semiseg report --compare RUN...``: one self-contained page comparing methods across runs.

Runs are grouped by *setting* (data source + options + working size + labeled amount) and, within a
setting, by method (name + options). Per group: mean ± sample std (ddof = 1) of the test headline
over its runs (different split seeds), gain over the ``supervised`` group of the same setting and
gap recovered = (method − supervised) / (oracle − supervised), with the ``oracle`` group of the same
setting (or, failing that, any oracle on the same data). Then the same test images, side by side,
predicted by one run of each method (the same split seed where the methods share one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.atomic import atomic_write_text
from semiseg.errors import ConfigError, SemisegError
from semiseg.report import figures
from semiseg.report.gallery import image_score, predict_stem, thumbs, torch_threads
from semiseg.report.html import Markup, fmt, h, img, join, num, page, section, table
from semiseg.report.rundata import RunInfo, read_run

COMPARE_BUDGET = 5 * 1024 * 1024
COMPARE_THUMB_PX = 128
COMPARE_IMAGES = 6
EXTRA_METRICS = ("dice", "iou", "dice_pooled", "miou")
log_ = logging.getLogger(__name__)


@dataclass
class MethodGroup:
    """Runs of one method (same options) in one setting."""

    label: str
    method: str
    runs: list[RunInfo] = field(default_factory=list)

    def test_values(self, key: str = "headline") -> list[float]:
        out = []
        for r in self.runs:
            v = (r.results.get("test") or {}).get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
        return out

    def val_values(self) -> list[float]:
        out = []
        for r in self.runs:
            v = (r.results.get("val") or {}).get(r.results.get("val_metric"))
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.append(float(v))
        return out


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof = 1; None with fewer than two values)."""
    if not values:
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def gap_recovered(method: float | None, supervised: float | None, oracle: float | None) -> float | None:
    """(method − supervised) / (oracle − supervised); None when a value is missing or when the oracle is
    not better than supervised (there is no gap to recover, and the ratio would only mislead)."""
    if method is None or supervised is None or oracle is None or oracle - supervised <= 1e-12:
        return None
    return (method - supervised) / (oracle - supervised)


def _data_key(run: RunInfo) -> str:
    d = run.config.get("data") or {}
    return json.dumps([d.get("source"), d.get("options"), d.get("size")], sort_keys=True)


def setting_of(run: RunInfo) -> tuple[str, str]:
    """``(key, label)`` of the run's setting: same data and labeled amount."""
    d, s = run.config.get("data") or {}, run.config.get("split") or {}
    key = json.dumps([_data_key(run), s.get("labeled"), s.get("files")], sort_keys=True)
    opts = d.get("options") or {}
    extra = (" " + ",".join(f"{k}={v}" for k, v in sorted(opts.items()))) if opts else ""
    size = d.get("size")
    label = f"{d.get('source')}{extra}"
    if isinstance(size, list) and len(size) == 2:
        label += f" · size {size[0]}×{size[1]}"
    label += f" · labeled {s.get('labeled')}" if not s.get("files") else f" · split files {s.get('files')}"
    return key, label


def variant_label(name: str, first: dict, options: dict) -> str:
    """A method's name, plus the options where this variant differs from the method's first group
    (``dst-cbc (ratios=[1.0, 1.0])``), so that two variants of one method read apart."""
    changed = [f"{k}={options.get(k)}" for k in sorted(set(first) | set(options)) if first.get(k) != options.get(k)]
    return f"{name} ({', '.join(changed)})" if changed else name


def group_runs(runs: Sequence[RunInfo]) -> dict[str, tuple[str, list[MethodGroup]]]:
    """setting key -> (label, method groups in first-seen order)."""
    out: dict[str, tuple[str, list[MethodGroup]]] = {}
    index: dict[tuple[str, str], MethodGroup] = {}
    first_options: dict[tuple[str, str], dict] = {}  # (setting, method) -> options of its first group
    for run in runs:
        skey, slabel = setting_of(run)
        method = dict(run.config.get("method") or {"name": run.method})
        mkey = json.dumps(method, sort_keys=True, default=str)
        if (skey, mkey) not in index:
            groups = out.setdefault(skey, (slabel, []))[1]
            first = first_options.setdefault((skey, run.method), method)
            index[(skey, mkey)] = MethodGroup(variant_label(run.method, first, method), run.method)
            groups.append(index[(skey, mkey)])
        index[(skey, mkey)].runs.append(run)
    rank = {"supervised": 0, "oracle": 2}
    for _, groups in out.values():
        groups.sort(key=lambda g: rank.get(g.method, 1))  # stable: other methods keep first-seen order
    return out


def _reference(groups: list[MethodGroup], all_groups: list[tuple[str, MethodGroup]], name: str,
               data_key: str) -> MethodGroup | None:
    for g in groups:
        if g.method == name:
            return g
    for dk, g in all_groups:  # an oracle does not depend on the labeled amount: any on the same data
        if g.method == name and dk == data_key and name == "oracle":
            return g
    return None


def _pm(mean: float | None, std: float | None, key: str) -> Markup:
    text = fmt(mean) + ("" if std is None else f" ± {fmt(std)}")
    return h("td", text, cls="num", data_key=key, data_value=None if mean is None else repr(mean),
             data_std=None if std is None else repr(std))


def metric_table(slabel: str, groups: list[MethodGroup], all_groups: list[tuple[str, MethodGroup]]) -> Markup:
    """One setting's table: mean ± std, gain over supervised, gap recovered."""
    first = groups[0].runs[0]
    metric = first.headline_metric
    data_key = _data_key(first)
    sup = _reference(groups, all_groups, "supervised", data_key)
    ora = _reference(groups, all_groups, "oracle", data_key)
    sup_m = mean_std(sup.test_values())[0] if sup else None
    ora_m = mean_std(ora.test_values())[0] if ora else None
    extra = [k for k in EXTRA_METRICS if k != metric and any(g.test_values(k) for g in groups)]
    rows = []
    for g in groups:
        m, s = mean_std(g.test_values())
        seeds = sorted({r.results.get("split_seed") for r in g.runs}, key=str)
        secs = [float(r.results.get("stage_seconds") or 0) for r in g.runs]
        key = f"{slabel}|{g.label}"
        gain = None if m is None or sup_m is None or g is sup else m - sup_m
        gap = None if g is sup or g is ora else gap_recovered(m, sup_m, ora_m)
        rows.append([h("b", g.label), num(len(g.runs), f"{key}|runs"), ", ".join(map(str, seeds)),
                     _pm(m, s, f"{key}|headline"),
                     *[_pm(*mean_std(g.test_values(k)), f"{key}|{k}") for k in extra],
                     _pm(*mean_std(g.val_values()), f"{key}|val"),
                     num(gain, f"{key}|gain"), num(gap, f"{key}|gap_recovered"),
                     num(sum(secs) / len(secs) if secs else None, None, 0)])
    head = ("method", "runs", "split seeds", f"test {metric}", *[f"test {k}" for k in extra],
            f"val {first.results.get('val_metric') or ''}".strip(),
            "gain over supervised", "gap recovered", "train s / run")
    note = ("mean ± sample std over runs; gain and gap recovered from the means; gap recovered = (method − "
            "supervised) / (oracle − supervised)")
    if not (sup and ora):
        note += " — needs supervised and oracle runs (missing here)"
    elif ora_m is not None and sup_m is not None and ora_m <= sup_m:
        note += f" — undefined here: the oracle ({fmt(ora_m)}) does not beat supervised ({fmt(sup_m)})"
    return join(table(head, rows), h("p", note, cls="muted"))


def _side_by_side(slabel: str, groups: list[MethodGroup], n_images: int, thumb_px: int,
                  log: Callable[[str], None]) -> Markup:
    from semiseg.api import load_run

    seed_sets = [{r.results.get("split_seed") for r in g.runs} for g in groups]
    common = set.intersection(*seed_sets) if seed_sets else set()
    seed = min(common, key=str) if common else None
    reps = [next((r for r in g.runs if r.results.get("split_seed") == seed), g.runs[0]) for g in groups]
    stems_sets = [set(r.splits.get("test") or []) for r in reps]
    shared = [s for s in reps[0].splits.get("test") or [] if all(s in ss for ss in stems_sets)]
    if not shared:
        return h("p", "The runs share no test image.", cls="muted")
    idx = sorted({int(round(i)) for i in np.linspace(0, len(shared) - 1, min(n_images, len(shared)))})
    stems = [shared[i] for i in idx]
    cells: dict[str, dict[str, Any]] = {s: {} for s in stems}
    base: dict[str, dict[str, str]] = {}
    classes = None
    for g, rep in zip(groups, reps, strict=True):
        try:
            ctx, model = load_run(rep.path)
        except SemisegError as e:
            log(f"report: {rep.path}: pictures unavailable: {e}")
            for s in stems:
                cells[s][g.label] = h("td", f"unavailable: {e}")
            continue
        classes = ctx.classes
        for s in stems:
            p = predict_stem(model, ctx.source, s, ctx.config, ctx.device)
            t = thumbs(p, classes, thumb_px)
            base.setdefault(s, t)
            metric, score = image_score(p.pred, p.gt, classes) if p.gt is not None else ("score", None)
            cells[s][g.label] = h("td", img(t["pred"], f"{g.label} prediction of {s}"),
                                  f"{metric} {fmt(score, 3)}")
        log(f"compare: {g.label} predicted {len(stems)} images")
    if classes is None:
        return h("p", "No run of this setting could be loaded.", cls="muted")
    rows = []
    for s in stems:
        b = base.get(s, {})
        rows.append([h("td", img(b["image"], f"image {s}"), s) if "image" in b else h("td", s),
                     h("td", img(b["gt"], f"ground truth of {s}")) if "gt" in b else h("td", "—"),
                     *[cells[s].get(g.label, h("td", "—")) for g in groups]])
    swatches = [join(h("span", "", cls="swatch", style=f"background:{c}"), n)
                for n, c in figures.legend(classes)]
    seeds = f"split seed {seed}" if seed is not None else "each method's first run"
    return join(h("p", f"Predictions of one run per method ({seeds}); classes:", *swatches, cls="muted"),
                table(("image", "ground truth", *[g.label for g in groups]), rows, cls="gallery"))


def render_compare(runs: Sequence[RunInfo], *, skipped: Sequence[str] = (), n_images: int = COMPARE_IMAGES,
                   thumb_px: int = COMPARE_THUMB_PX, images: bool = True,
                   log: Callable[[str], None] = log_.info) -> str:
    """The HTML of a comparison page."""
    settings = group_runs(runs)
    all_groups = [(_data_key(g.runs[0]), g) for _, gs in settings.values() for g in gs]
    parts: list[Any] = []
    for i, (slabel, groups) in enumerate(settings.values()):
        metric = groups[0].runs[0].headline_metric
        ms = [mean_std(g.test_values()) for g in groups]
        chart = img(figures.bar_figure([g.label for g in groups], [m for m, _ in ms], [s for _, s in ms],
                                       f"test {metric} (mean ± std)"), f"test {metric} per method", cls="fig")
        block = [h("h3", slabel), metric_table(slabel, groups, all_groups), chart]
        if images:
            block += [h("h4", "Same test images across methods"), _side_by_side(slabel, groups, n_images,
                                                                                 thumb_px, log)]
        parts.append(h("div", *block, id=f"setting-{i}"))
    rows = [[r.name, r.method, fmt(r.results.get("split_seed")), num(r.headline, f"run|{r.name}|headline"),
             fmt(r.results.get("stage_seconds"), 0), str(r.path)] for r in runs]
    details = h("details", h("summary", f"all {len(runs)} runs"),
                table(("run", "method", "split seed", "test headline", "train s", "directory"), rows))
    unfinished = (h("p", "not finished (no results.json): " + ", ".join(skipped), cls="muted")
                  if skipped else None)
    body = join(section("methods", "Methods", *parts), section("runs", "Runs", details, unfinished))
    subtitle = f"{len(runs)} runs · {len(settings)} setting(s) · generated {time.strftime('%Y-%m-%d %H:%M')}"
    return page("semiseg comparison", body, subtitle=subtitle, nav=[("methods", "methods"), ("runs", "runs")])


def write_compare_report(run_dirs: Sequence[Path], out_path: Path | None = None, *,
                         n_images: int = COMPARE_IMAGES, thumb_px: int = COMPARE_THUMB_PX,
                         threads: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Write the comparison page of ``run_dirs`` to ``out_path`` (default: ``compare.html`` in their
    common parent directory). Unfinished runs are listed, not compared. ``threads``: torch CPU threads
    while predicting (restored afterwards)."""
    log = log or log_.info
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ConfigError("report --compare: give at least one run directory")
    runs, skipped = [], []
    for d in dirs:
        if (d / "results.json").is_file():
            runs.append(read_run(d))
        elif (d / "config.yaml").is_file():
            skipped.append(str(d))
        else:
            raise ConfigError(f"{d}: not a run directory (no config.yaml)")
    if not runs:
        raise ConfigError("report --compare: none of the runs has finished (no results.json)")
    with torch_threads(threads):
        html = render_compare(runs, skipped=skipped, n_images=n_images, thumb_px=thumb_px, log=log)
        if len(html.encode()) > COMPARE_BUDGET:
            log(f"compare: {len(html.encode()) / 1e6:.1f} MB is over the budget; fewer, smaller images")
            html = render_compare(runs, skipped=skipped, n_images=max(1, n_images // 2),
                                  thumb_px=min(thumb_px, 96), log=log)
    if out_path is None:
        resolved = {d.resolve() for d in dirs}
        common = Path(os.path.commonpath([str(d) for d in resolved]))
        out_path = (common.parent if common in resolved else common) / "compare.html"
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, html)
    return out_path
