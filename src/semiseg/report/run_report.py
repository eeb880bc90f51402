"""``semiseg report RUN``: one self-contained HTML page about a finished run.

The page (``RUN/report.html``) embeds every picture as a ``data:`` URI and its CSS inline; it has no
scripts and no external references, so it opens offline and can be mailed. Numbers (headline,
per-subset, per-class, validation) are copied from ``results.json``; each metric cell carries the
exact value in ``data-value`` so tests can check the page against the file. The gallery re-evaluates
the delivered model on the test split to rank images (best / median / worst).

Size budget: :data:`RUN_REPORT_BUDGET` bytes with thumbnails of at most :data:`THUMB_PX` pixels
(longer side) and at most :data:`MAX_GALLERY` gallery images; a page over budget is rebuilt once
with half the gallery and stronger JPEG compression.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.atomic import atomic_write_text
from semiseg.data.classes import ClassTable
from semiseg.errors import SemisegError
from semiseg.progress import progress_bar
from semiseg.report import figures
from semiseg.report.gallery import (
    ImagePrediction,
    Scorer,
    pick_cases,
    predict_stem,
    pseudo_thumbs,
    shrink,
    thumbs,
    torch_threads,
)
from semiseg.report.html import Markup, fmt, h, img, join, num, page, section, table
from semiseg.report.rundata import RunInfo, StageInfo, read_run

RUN_REPORT_BUDGET = 3 * 1024 * 1024
THUMB_PX = 160
MAX_GALLERY = 12
PSEUDO_EXAMPLES = 4
EXAMPLE_PX = 112
MAX_ROUNDS_WITH_EXAMPLES = 4
HEADLINE_KEYS = ("headline", "dice", "iou", "dice_pooled", "iou_pooled", "miou", "pixel_accuracy")
log_ = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ config
def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_compact(v) for v in value) + "]"
    return "—" if value is None else str(value)


def config_section(run: RunInfo) -> Markup:
    """The resolved config in brief, split sizes from ``splits/*.txt``, and the full YAML folded away."""
    cfg = run.config
    method = dict(cfg.get("method") or {})
    name = method.pop("name", run.method)
    data, split = cfg.get("data") or {}, cfg.get("split") or {}
    model, train, ev = cfg.get("model") or {}, cfg.get("train") or {}, cfg.get("eval") or {}
    sizes = ", ".join(f"{k} {len(v)}" for k, v in run.splits.items())
    budget = {k: train.get(k) for k in ("steps", "batch_size", "unlabeled_batch_size", "optimizer", "lr",
                                         "weight_decay", "lr_schedule", "head_lr_mult", "amp", "eval_every")}
    rows = [
        ("method", h("b", name)), ("method options", _compact(method)),
        ("data", _compact({k: data.get(k) for k in ("source", "root", "size", "options", "benchmark_gt")})),
        ("split", _compact({k: split.get(k) for k in ("seed", "labeled", "val", "test", "files")})),
        ("split sizes", sizes),
        ("model", _compact({k: model.get(k) for k in ("arch", "encoder", "weights", "decoder_channels",
                                                       "options")})),
        ("train budget", _compact(budget)), ("evaluation", _compact(ev)), ("seed", _compact(cfg.get("seed"))),
    ]
    import yaml

    full = h("details", h("summary", "full config.yaml"),
             h("pre", yaml.safe_dump(cfg, sort_keys=False)))
    return section("config", "Configuration", table(("key", "value"), rows, cls="kv"), full)


# ----------------------------------------------------------------------------------------- metrics
def _metric_rows(prefix: str, values: dict[str, Any], keys: Sequence[str]) -> list[list[Any]]:
    return [[k, num(values.get(k), f"{prefix}.{k}")] for k in keys if isinstance(values.get(k), (int, float))]


def summary_section(run: RunInfo) -> Markup:
    """Headline test metrics, per-subset test metrics, validation metrics, timings and provenance."""
    res = run.results
    test = res.get("test") or {}
    parts: list[Any] = []
    if test:
        rows = _metric_rows("test", test, HEADLINE_KEYS)
        parts += [h("h3", f"Test ({test.get('n_images', '?')} images, original resolution, protocol "
                          f"{test.get('protocol', '?')}; headline = {run.headline_metric})"),
                  table(("metric", "value"), rows)]
        subsets = test.get("per_subset") or {}
        if subsets:
            keys = [k for k in ("dice", "iou", "dice_pooled", "miou", "pixel_accuracy")
                    if any(isinstance(v.get(k), (int, float)) for v in subsets.values())]
            srows = [[s, num(v.get("n_images"), f"test.per_subset.{s}.n_images"),
                      *[num(v.get(k), f"test.per_subset.{s}.{k}") for k in keys]] for s, v in subsets.items()]
            mos = test.get("mean_of_subsets") or {}
            if mos:
                srows.append([h("i", "mean of subsets"), "", *[num(mos.get(k), f"test.mean_of_subsets.{k}")
                                                              for k in keys]])
            parts += [h("h3", "Per test subset"), table(("subset", "images", *keys), srows)]
    else:
        parts.append(h("p", "This run has no test split.", cls="muted"))
    val = res.get("val") or {}
    if val:
        parts += [h("h3", f"Validation (working size; model selection by {res.get('val_metric')})"),
                  table(("metric", "value"), _metric_rows("val", val, sorted(val)))]
    stages = res.get("stages") or []
    trows = [[s.get("dir"), num(s.get("seconds"), None, 1), num(s.get("peak_rss_mb"), None, 0)]
             for s in stages]
    trows.append([h("b", "all stages"), num(res.get("stage_seconds"), "stage_seconds", 1),
                  num(res.get("peak_rss_mb"), "peak_rss_mb", 0)])
    parts += [h("h3", "Time and memory"), table(("stage", "seconds", "peak RSS MB"), trows),
              h("p", "command: ", h("code", res.get("command") or "—"), " · commit: ",
                h("code", res.get("commit") or "—"), cls="muted")]
    return section("summary", "Results", *parts)


def per_class_section(run: RunInfo) -> Markup:
    """IoU and Dice per class on the test set (from ``results.json``)."""
    test = run.results.get("test") or {}
    iou, dice = test.get("per_class_iou") or {}, test.get("per_class_dice") or {}
    if not iou:
        return section("per-class", "Per-class scores", h("p", "No test scores.", cls="muted"))
    rows = [[n, num(v, f"test.per_class_iou.{n}"), num(dice.get(n), f"test.per_class_dice.{n}")]
            for n, v in iou.items()]
    rows.append([h("b", "mIoU (absent classes excluded)"), num(test.get("miou"), "test.miou"), ""])
    return section("per-class", "Per-class scores (test)", table(("class", "IoU", "Dice"), rows))


def curves_section(run: RunInfo) -> Markup:
    """Training loss and validation curves of every stage."""
    parts: list[Any] = []
    for st in run.stages:
        if not st.metrics:
            continue
        parts.append(img(figures.curves_figure(st.metrics, f"stage {st.path.name}",
                                               run.results.get("val_metric")),
                         f"training curves of stage {st.path.name}", cls="fig"))
    if not parts:
        parts.append(h("p", "No stage logged metrics.", cls="muted"))
    return section("curves", "Training curves", *parts)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return num(value)
    if isinstance(value, (dict, list)):
        return _compact(value)
    return "—" if value is None else str(value)


def diagnostics_section(run: RunInfo) -> Markup | None:
    """A method's own diagnostics (``results.json`` ``diagnostics``): its note and any row tables."""
    diag = run.results.get("diagnostics")
    if not isinstance(diag, dict) or not diag:
        return None
    parts: list[Any] = [h("p", diag["note"], cls="muted")] if isinstance(diag.get("note"), str) else []
    for key, value in diag.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            cols = list(dict.fromkeys(k for r in value for k in r))
            parts += [h("h3", key), table(cols, [[_cell(r.get(c)) for c in cols] for r in value])]
        elif key != "note":
            parts.append(h("p", h("b", key), ": ", _compact(value)))
    return section("diagnostics", "Method diagnostics", *parts)


# ---------------------------------------------------------------------------------- pseudo labels
def _round_row(st: StageInfo, rnd: Any) -> list[Any]:
    s, q = rnd.stats, rnd.stats.get("quality") or {}
    key = f"pseudo.{st.path.name}.{rnd.name}"
    return [st.path.name, rnd.name, num(s.get("num_images"), f"{key}.num_images"),
            num(s.get("coverage"), f"{key}.coverage"),
            num(s.get("mean_confidence"), f"{key}.mean_confidence"),
            num(s.get("mean_confidence_selected"), f"{key}.mean_confidence_selected"),
            num(s.get("flip_rate"), f"{key}.flip_rate"), num(q.get("miou"), f"{key}.quality.miou"),
            num(q.get("foreground_dice"), f"{key}.quality.foreground_dice"),
            num(q.get("pixel_accuracy"), f"{key}.quality.pixel_accuracy")]


def _round_examples(rnd: Any, ctx: Any, classes: ClassTable, n: int, thumb_px: int, quality: int) -> Markup:
    from semiseg.data.decode import read_image

    if ctx is None or n <= 0 or not len(rnd):
        return Markup("")
    picks = sorted({round(i) for i in np.linspace(0, len(rnd) - 1, min(n, len(rnd)))})
    by_stem = ctx.source.by_stem()
    benchmark = bool(ctx.config.data.benchmark_gt)
    rows = []
    cols = ("image", "pseudo", "confidence") + (("gt",) if benchmark else ())
    px = min(thumb_px, EXAMPLE_PX)
    for i in picks:
        stem = rnd.stems[i]
        sample = by_stem.get(stem)
        if sample is None:
            continue
        label, conf = rnd.labels(stem), rnd.confidence(stem)
        gt = ctx.source.decode_mask(sample.mask) if benchmark and sample.mask is not None else None
        t = pseudo_thumbs(read_image(sample.image), label, conf, classes, px, gt=gt, quality=quality)
        rows.append([stem, *[h("td", img(t[k], f"{k} of {stem}")) if k in t else "—" for k in cols]])
    if not rows:
        return Markup("")
    head = ("unlabeled image", "image", "pseudo label", "confidence",
            "ground truth")[: len(cols) + 1]
    return table(head, rows, cls="gallery")


def pseudo_section(run: RunInfo, ctx: Any, classes: ClassTable | None, thumb_px: int, quality: int,
                   examples: int) -> Markup:
    """Statistics of every pseudo-label round, its histogram / class shares and a few labelled images."""
    rounds = [(st, r) for st in run.stages for r in st.rounds]
    if not rounds:
        return section("pseudo-labels", "Pseudo labels",
                       h("p", "This run made no pseudo labels.", cls="muted"))
    head = ("stage", "round", "images", "coverage", "mean conf.", "mean conf. (selected)", "flip rate",
            "GT mIoU", "GT fg Dice", "GT pixel acc.")
    parts: list[Any] = [
        table(head, [_round_row(st, r) for st, r in rounds]),
        h("p", "coverage = share of pixels selected; flip rate = share of pixels labelled in both this "
               "and the previous round whose class changed; GT columns (benchmark mode only) score the "
               "selected pixels against the hidden ground truth; in pictures grey = not selected.",
          cls="muted")]
    with_examples = {id(r) for _, r in rounds[-MAX_ROUNDS_WITH_EXAMPLES:]}
    for st, rnd in rounds:
        parts.append(h("h3", f"{st.path.name} / {rnd.name}"))
        policy = rnd.provenance.get("policy") or {}
        if policy:
            params = policy.get("params") or {}
            parts.append(h("p", f"selection policy: {policy.get('name')}" + (f" ({_compact(params)})" if params
                                                                             else ""), cls="muted"))
        names = classes.names if classes is not None else ()
        shares = rnd.stats.get("class_share") or []
        line = [f"{names[i] if i < len(names) else i} {fmt(v)}" for i, v in enumerate(shares)]
        per_class = (rnd.stats.get("quality") or {}).get("per_class_iou") or []
        if line:
            parts.append(h("p", "class share of selected pixels: " + " · ".join(line), cls="muted"))
        if per_class:
            iou = [f"{names[i] if i < len(names) else i} {fmt(v)}" for i, v in enumerate(per_class)]
            parts.append(h("p", "IoU against ground truth per class: " + " · ".join(iou), cls="muted"))
        if classes is not None:
            parts.append(img(figures.round_figure(rnd.stats, classes), f"statistics of round {rnd.name}",
                             cls="fig"))
            if id(rnd) in with_examples:
                parts.append(_round_examples(rnd, ctx, classes, examples, thumb_px, quality))
    return section("pseudo-labels", "Pseudo labels", *parts)


# ----------------------------------------------------------------------------------------- gallery
def _pseudo_lookup(run: RunInfo) -> dict[str, Any]:
    """Latest round holding each stem (test images usually have none)."""
    out: dict[str, Any] = {}
    for st in run.stages:
        for rnd in st.rounds:
            for stem in rnd.stems:
                out[stem] = rnd
    return out


def gallery_section(run: RunInfo, ctx: Any, preds: list[tuple[Any, ImagePrediction]], note: str | None,
                    thumb_px: int, quality: int, metric: str) -> Markup:
    """Rows of test images: image, ground truth, prediction, errors, confidence (+ pseudo label)."""
    if ctx is None:
        return section("gallery", "Test gallery", h("p", note or "No gallery.", cls="muted"))
    classes = ctx.classes
    pseudo = _pseudo_lookup(run)
    has_pseudo = any(c.stem in pseudo for c, _ in preds)
    cols = ["image", "gt", "pred", "errors", "confidence"] + (["pseudo"] if has_pseudo else [])
    titles = {"image": "image", "gt": "ground truth", "pred": "prediction", "errors": "errors",
              "confidence": "confidence", "pseudo": "pseudo label"}
    rows = []
    for case, p in preds:
        t = thumbs(p, classes, thumb_px, quality)
        if case.stem in pseudo:  # labels at the working size, shown at the thumbnail's geometry
            label = figures.resize(pseudo[case.stem].labels(case.stem), p.image.shape[:2], nearest=True)
            t["pseudo"] = figures.encode_image(figures.overlay(p.image, label, classes), quality=quality)
        label = h("td", h("b", case.tag, cls=case.tag if case.tag in ("best", "worst") else None), h("br"),
                  case.stem, h("br"), f"{metric} {fmt(case.score)}",
                  h("br") if case.subset else None, case.subset)
        rows.append([label, *[h("td", img(t[c], f"{titles[c]} of {case.stem}")) if c in t else h("td", "—")
                              for c in cols]])
    swatches = [join(h("span", "", cls="swatch", style=f"background:{color}"), name)
                for name, color in figures.legend(classes)]
    err = ("errors: green = true positive, red = false positive, blue = false negative" if
           (classes.is_binary or classes.foreground is not None) else "errors: red = wrong class")
    intro = h("p", f"Ranked by per-image {metric} of the delivered model; thumbnails ≤ {thumb_px} px. ",
              err, "; grey = ignored / not predicted; confidence = max softmax: dark = 1 / classes (a coin toss), "
              "yellow = 1.", cls="muted")
    parts = [intro, h("p", "classes:", *swatches, cls="muted")]
    if note:
        parts.append(h("p", note, cls="muted"))
    parts.append(table(("case", *[titles[c] for c in cols]), rows, cls="gallery"))
    return section("gallery", "Test gallery: best, median and worst", *parts)


Gallery = list[tuple[Any, ImagePrediction]]


def _rank_and_predict(ctx: Any, model: Any, run: RunInfo, max_gallery: int, max_ranked: int | None,
                      thumb_px: int, log: Callable[[str], None], progress: bool = False,
                      console: Any = None) -> tuple[Gallery, str | None, str]:
    """One pass over the test images: score each (as the evaluator does), keep a thumbnail-sized copy."""
    stems = ctx.test_stems
    note = None
    if max_ranked is not None and len(stems) > max_ranked:
        idx = np.linspace(0, len(stems) - 1, max_ranked).round().astype(int)
        stems = [stems[i] for i in sorted(set(idx.tolist()))]
        note = f"ranked among {len(stems)} of {len(ctx.test_stems)} test images (evenly spaced)"
    scorer = Scorer(ctx.classes)
    if not stems or max_gallery <= 0:
        return [], "no test images", scorer.metric
    t0 = time.time()
    by_stem = ctx.source.by_stem()
    small: dict[str, ImagePrediction] = {}
    with progress_bar("report: test images", len(stems), enabled=progress, console=console) as update:
        for k, stem in enumerate(stems):
            p = predict_stem(model, ctx.source, stem, ctx.config, ctx.device)
            update(k + 1, len(stems))
            if p.gt is None:
                continue
            scorer.add(stem, by_stem[stem].subset, p.pred, p.gt)
            small[stem] = shrink(p, thumb_px)
    metric = scorer.metric
    if note is None and run.headline is not None and abs(scorer.headline() - run.headline) > 1e-6:
        note = (f"re-evaluation gives {metric} {fmt(scorer.headline())}, results.json says "
                f"{fmt(run.headline)} (the code or data changed since the run); the gallery shows the "
                "re-evaluation")
    cases = pick_cases(scorer.records, metric, max_gallery)
    log(f"report: scored {len(small)} test images in {time.time() - t0:.1f}s")
    return [(c, small[c.stem]) for c in cases], note, metric


# -------------------------------------------------------------------------------------------- page
def render_run_report(run: RunInfo, ctx: Any = None, preds: list[tuple[Any, ImagePrediction]] | None = None,
                      *, gallery_note: str | None = None, metric: str = "dice", thumb_px: int = THUMB_PX,
                      quality: int = 82, pseudo_examples: int = PSEUDO_EXAMPLES) -> str:
    """The HTML of a run report (``ctx`` None: no pictures that need the data)."""
    classes = ctx.classes if ctx is not None else None
    body = join(summary_section(run), config_section(run), curves_section(run),
                pseudo_section(run, ctx, classes, thumb_px, quality, pseudo_examples), diagnostics_section(run),
                gallery_section(run, ctx, preds or [], gallery_note, thumb_px, quality, metric),
                per_class_section(run))
    head = run.headline
    subtitle = (f"method {run.method} · data {(run.config.get('data') or {}).get('source')} · test "
                f"{run.headline_metric} {fmt(head)} · generated {time.strftime('%Y-%m-%d %H:%M')}")
    nav = [("summary", "results"), ("config", "config"), ("curves", "curves"),
           ("pseudo-labels", "pseudo labels"), ("gallery", "gallery"), ("per-class", "per class")]
    return page(f"semiseg run {run.name}", body, subtitle=subtitle, nav=nav)


def write_run_report(run_dir: Path, *, out: Path | None = None, max_gallery: int = MAX_GALLERY,
                     thumb_px: int = THUMB_PX, max_ranked: int | None = 200, threads: int | None = None,
                     log: Callable[[str], None] | None = None, progress: bool = False,
                     console: Any = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and return its path.

    ``max_gallery`` test images are shown (a third best, a third median, a third worst), ranked among at
    most ``max_ranked`` test images. When the run's data or model cannot be loaded, the page still has
    every number and curve, and says why the pictures are missing. ``threads``: torch CPU threads while
    predicting (restored afterwards; 1 is fastest on a busy machine). ``progress``: a bar over the test images
    (also off when the run's ``train.progress`` is false).
    """
    log = log or log_.info
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    ctx, preds, note, metric = None, [], None, run.headline_metric
    try:
        from semiseg.api import load_run

        with torch_threads(threads):
            ctx, model = load_run(run_dir)
            preds, note, metric = _rank_and_predict(ctx, model, run, max_gallery, max_ranked, thumb_px, log,
                                                    progress and ctx.config.train.progress, console)
    except SemisegError as e:
        ctx, note = None, f"pictures unavailable: {e}"
        log(f"report: {note}")  # the page still has every number; the user must still hear why
    html = render_run_report(run, ctx, preds, gallery_note=note, metric=metric, thumb_px=thumb_px)
    if len(html.encode()) > RUN_REPORT_BUDGET:
        log(f"report: {len(html.encode()) / 1e6:.1f} MB is over the budget; halving the gallery")
        html = render_run_report(run, ctx, preds[::2], gallery_note=note, metric=metric,
                                 thumb_px=thumb_px, quality=60, pseudo_examples=2)
    path = Path(out) if out is not None else run_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, html)
    return path
