"""Which unlabeled images to annotate next (``semiseg suggest-labels RUN --n K``).

The criterion (``strategy="uncertain"``, the default) is **uncertainty sampling** (Lewis & Gale 1994; Settles,
"Active Learning Literature Survey", 2009), in the per-image form segmentation active learning uses: an image's
score is its mean pixel *least confidence*, ``1 - max_c p_c``, under the run's delivered model (fused with
its horizontal flip). Where the run has ST++'s stability ranking (``st++``: how much the supervised snapshots'
predictions disagree with the final one, Yang et al. 2022), the two are combined by their mean rank: an image
both unstable and unconfident comes first.

A **diversity rule** keeps K near-duplicate frames of one video from all being chosen (the failure of pure
uncertainty ranking that core-set and BADGE address: Sener & Savarese 2018, Ash et al. 2020): candidates are
taken best first, and one whose thumbnail (16x16, mean-centred, unit length) has cosine similarity above
``similarity`` with an image already chosen is skipped.

**Group-aware** (``stratify``, on by default): where the pool joins several source datasets (sample ``subset``s,
e.g. Kvasir-SEG + CVC-ClinicDB), K is split across them in proportion to their unlabeled images (largest
remainder), each part filled best first, so that the harder source cannot take every mask (unstratified, the
polyp suggestion took 31 of 33 from Kvasir-SEG: polyp-notes.md); within a part, one frame per video (sample
``group``) is taken before a second from any video. This is stratified uncertainty sampling, the
representativeness term of hybrid criteria (Settles 2009, sec. 5.1).

``strategy="typical"`` is the low-budget criterion instead (TypiClust, :mod:`semiseg.report.typical`): the most
typical image of each cluster no mask covers yet, in the run's encoder features (stratified alike).

``strategy="confident"`` takes the most confident end instead (stratified alike) and ``random`` a seeded draw
(near-duplicates skipped, nothing else): the two control arms of the measured protocol (the confident end should
be the worst choice). Test images are never read.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from semiseg.atomic import atomic_write_text
from semiseg.errors import ConfigError
from semiseg.finished import load_run
from semiseg.layout import RunLayout
from semiseg.progress import progress_bar
from semiseg.report.figures import encode_image, overlay, resize, thumb_size

Strategy = Literal["uncertain", "typical", "confident", "random"]
STRATEGIES = ("uncertain", "typical", "confident", "random")
LIST_FILE, SHEET_FILE = "labels-to-add.txt", "labels-to-add.html"
THUMB = 16  # side of the thumbnails the diversity rule compares
SHEET_PX = 192  # longest side of an image on the contact sheet


def least_confidence(probs: np.ndarray) -> float:
    """Mean over pixels of ``1 - max_c p_c`` for ``C×H×W`` probabilities: 0 for a certain image, up to 1 - 1/C."""
    return float(1.0 - probs.max(axis=0).mean())


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A ``THUMB×THUMB×3`` copy of an RGB image, mean-centred and of unit length (cosine similarity = dot)."""
    small = resize(image, (THUMB, THUMB)).astype(np.float32).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 0 else small


def mean_rank(*scores: np.ndarray) -> np.ndarray:
    """The mean of each score's rank (0 = highest), NaN ranked last: a combination free of the scores' scales."""
    ranks = []
    for s in scores:
        key = np.where(np.isnan(s), -np.inf, s)
        order = np.argsort(-key, kind="stable")
        r = np.empty(len(s))
        r[order] = np.arange(len(s))
        ranks.append(r)
    return np.mean(ranks, axis=0)


def select_diverse(order: list[int], features: np.ndarray, n: int, similarity: float,
                   groups: list[str | None] | None = None) -> tuple[list[int], int]:
    """The first ``n`` of ``order`` whose feature has cosine similarity ``<= similarity`` with every one chosen
    before it. With ``groups``, a candidate of a group already chosen from waits until every other candidate was
    seen (one per video first). When that leaves fewer than ``n``, the waiting ones, then the near-duplicates,
    fill up in order. Returns (chosen, near-duplicates skipped)."""
    chosen: list[int] = []
    waiting: list[int] = []
    skipped: list[int] = []
    taken_groups: set[str] = set()

    def alike(i: int) -> bool:
        return bool(chosen) and float((features[chosen] @ features[i]).max()) > similarity

    for i in order:
        if len(chosen) == n:
            break
        group = groups[i] if groups is not None else None
        if alike(i):
            skipped.append(i)
        elif group is not None and group in taken_groups:
            waiting.append(i)
        else:
            chosen.append(i)
            if group is not None:
                taken_groups.add(group)
    for i in waiting:
        if len(chosen) == n:
            break
        if alike(i):
            skipped.append(i)
        else:
            chosen.append(i)
    return chosen + skipped[:n - len(chosen)], len(skipped)


def proportional_quotas(strata: list[str], n: int) -> dict[str, int]:
    """``n`` split across the strata in proportion to how often each occurs (largest remainder; ties by name)."""
    counts: dict[str, int] = {}
    for s in strata:
        counts[s] = counts.get(s, 0) + 1
    total = sum(counts.values())
    exact = {s: n * c / total for s, c in counts.items()}
    quotas = {s: min(int(e), counts[s]) for s, e in exact.items()}
    for s in sorted(counts, key=lambda s: (-(exact[s] - quotas[s]), s)):
        if sum(quotas.values()) == n:
            break
        if quotas[s] < counts[s]:
            quotas[s] += 1
    return quotas


def select_stratified(order: list[int], features: np.ndarray, n: int, similarity: float,
                      strata: list[str], groups: list[str | None]) -> tuple[list[int], int]:
    """:func:`select_diverse` within each stratum for its proportional quota; the union in ``order``'s order."""
    position = {i: p for p, i in enumerate(order)}
    chosen: list[int] = []
    skipped = 0
    for stratum, quota in proportional_quotas([strata[i] for i in order], n).items():
        part, part_skipped = select_diverse([i for i in order if strata[i] == stratum], features, quota,
                                            similarity, groups)
        chosen += part
        skipped += part_skipped
    return sorted(chosen, key=position.__getitem__), skipped


@dataclass
class Suggestion:
    stems: list[str]
    scores: list[float]
    strategy: str
    criterion: str
    skipped_as_duplicates: int
    files: dict[str, str]
    per_subset: dict[str, int]  # how many of the K come from each source dataset (empty for a single source)

    def to_dict(self) -> dict[str, Any]:
        return {"stems": self.stems, "scores": self.scores, "strategy": self.strategy, "criterion": self.criterion,
                "skipped_as_duplicates": self.skipped_as_duplicates, "files": self.files,
                "per_subset": self.per_subset}


def _stability(run_dir: Path, stems: list[str]) -> np.ndarray | None:
    """ST++'s per-image stability (higher = more stable) aligned with ``stems``, when the run ranked its images."""
    for stage in RunLayout(run_dir).stages():
        path = stage.file("stability.json")
        if path.is_file():
            doc = json.loads(path.read_text())
            by_stem = dict(zip(doc["stems"], doc["scores"], strict=True))
            return np.array([np.nan if by_stem.get(s) is None else by_stem[s] for s in stems], dtype=float)
    return None


def suggest_labels(run_dir: Path, n: int, *, out_dir: Path | None = None, strategy: Strategy = "uncertain",
                   similarity: float = 0.95, seed: int = 0, stratify: bool = True, progress: bool = True,
                   console: Any = None, log: Any = print) -> Suggestion:
    """Rank ``run_dir``'s unlabeled images for annotation and write the best ``n`` (see the module)."""
    from semiseg.pipeline.labeling import make_labeler

    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not 0 < similarity <= 1:
        raise ConfigError(f"--similarity {similarity}: a cosine similarity in (0, 1] (1 keeps near-duplicates)")
    if n < 1:
        raise ConfigError(f"--n {n}: ask for at least one image")
    ctx, model = load_run(run_dir, check=("unlabeled", "labeled") if strategy == "typical" else ("unlabeled",),
                          command="suggest-labels", log=log)
    stems = list(ctx.splits.unlabeled)
    if not stems:
        raise ConfigError(f"{run_dir}: the run has no unlabeled images to suggest (its split.labeled is 1)")
    if n > len(stems):
        raise ConfigError(f"--n {n}: the run has only {len(stems)} unlabeled images")
    arrays = ctx.arrays("unlabeled")
    labeler = make_labeler(ctx, model, flip=True)
    uncertainty = np.zeros(len(stems))
    features = np.zeros((len(stems), THUMB * THUMB * 3), dtype=np.float32)
    with progress_bar("suggest-labels: scoring", len(stems), enabled=progress, console=console) as update:
        for done, (i, probs) in enumerate(labeler.iter_predictions(arrays.images), 1):
            uncertainty[i] = least_confidence(probs)
            features[i] = thumbnail(np.asarray(arrays.images[i]))
            update(done, len(stems))
    stability = _stability(Path(run_dir), stems)
    criterion = "least confidence (mean 1 - max p), flip-fused"
    score = uncertainty
    if stability is not None:
        score = -mean_rank(uncertainty, -stability)  # higher is better: low stability and low confidence
        criterion += " + ST++ instability, by mean rank"
    if strategy == "confident":
        order = list(np.argsort(score, kind="stable"))
    elif strategy == "random":
        order = list(np.random.default_rng(seed).permutation(len(stems)))
    else:
        order = list(np.argsort(-score, kind="stable"))
    order = [int(i) for i in order]
    by_stem = ctx.source.by_stem()
    subsets = [by_stem[s].subset or "" for s in stems]
    if strategy == "typical":
        criterion = "typicality in the run's encoder features, one per least covered cluster (TypiClust)"
        chosen = _typical(ctx, model, n, subsets if stratify else [""] * len(stems), seed)
        skipped = 0
        if stratify and len(set(subsets)) > 1:
            criterion += "; K split across the source datasets in proportion to their unlabeled images"
    elif stratify and strategy != "random":
        groups = [by_stem[s].group for s in stems]
        chosen, skipped = select_stratified(order, features, n, similarity, subsets, groups)
        if len(set(subsets)) > 1:
            criterion += "; K split across the source datasets in proportion to their unlabeled images"
        if len({g for g in groups if g is not None}) < sum(g is not None for g in groups):
            criterion += "; one frame per video first"
    else:
        chosen, skipped = select_diverse(order, features, n, similarity)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picked = [stems[i] for i in chosen]
    atomic_write_text(out_dir / LIST_FILE, "".join(s + "\n" for s in picked))
    sheet = _contact_sheet(ctx, model, chosen, stems, uncertainty, stability, strategy, criterion)
    atomic_write_text(out_dir / SHEET_FILE, sheet)
    files = {"list": str(out_dir / LIST_FILE), "sheet": str(out_dir / SHEET_FILE)}
    per_subset = {sub: sum(subsets[i] == sub for i in chosen) for sub in sorted(set(subsets)) if sub}
    return Suggestion(picked, [float(uncertainty[i]) for i in chosen], strategy, criterion, skipped, files,
                      per_subset)


def _typical(ctx: Any, model: Any, n: int, subsets: list[str], seed: int) -> list[int]:
    """TypiClust's picks among the unlabeled images, each stratum (source dataset) for its proportional quota
    against its own labeled images; best first within a stratum, strata interleaved by pick rank."""
    from semiseg.report.typical import encoder_embedding, select_typical

    unl, lab = ctx.arrays("unlabeled"), ctx.arrays("labeled")
    by_stem = ctx.source.by_stem()
    lab_subsets = [by_stem[s].subset or "" for s in lab.stems]
    emb_u = encoder_embedding(model, unl.images, range(len(unl.stems)), device=ctx.device)
    emb_l = encoder_embedding(model, lab.images, range(len(lab.stems)), device=ctx.device)
    if len(set(subsets)) == 1:
        lab_subsets = subsets[:1] * len(lab.stems)  # one stratum: every labeled image covers it
    ranked: list[tuple[int, int]] = []
    for stratum, quota in proportional_quotas(subsets, n).items():
        mine = [i for i, s in enumerate(subsets) if s == stratum]
        theirs = [i for i, s in enumerate(lab_subsets) if s == stratum]
        picks = select_typical(emb_u[mine], emb_l[theirs], quota, seed)
        ranked += [(rank, mine[i]) for rank, i in enumerate(picks)]
    return [i for _, i in sorted(ranked)]


def _contact_sheet(ctx: Any, model: Any, chosen: list[int], stems: list[str], uncertainty: np.ndarray,
                   stability: np.ndarray | None, strategy: str, criterion: str) -> str:
    """One self-contained HTML page: each suggested image, and the run's prediction over it, best first."""
    from semiseg.pipeline.labeling import make_labeler

    images = ctx.arrays("unlabeled").images
    labeler = make_labeler(ctx, model, flip=True)
    cards = []
    for rank, (i, probs) in enumerate(labeler.iter_predictions(images, chosen), 1):
        image = np.asarray(images[i])
        size = thumb_size(image.shape, SHEET_PX)
        shown = resize(image, size)
        pred = resize(probs.argmax(0).astype(np.uint8), size, nearest=True)
        why = f"least confidence {uncertainty[i]:.3f}"
        if stability is not None and not np.isnan(stability[i]):
            why += f", stability {stability[i]:.3f}"
        cards.append(f'<figure><img src="{encode_image(shown)}" alt="image"><img src="'
                     f'{encode_image(overlay(shown, pred, ctx.classes))}" alt="prediction"><figcaption>'
                     f"<b>#{rank}</b> {html.escape(stems[i])}<br>{why}</figcaption></figure>")
    title = f"Images to label next ({len(chosen)}, {strategy})"
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:.4em;vertical-align:top}"
            "img{margin-right:2px}figcaption{font-size:.8em;max-width:400px;word-break:break-all}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>Run {html.escape(str(ctx.run_dir))}; criterion: "
            f"{html.escape(criterion)}; near-duplicates skipped. Each image is shown with the model's current "
            "prediction: annotate where it is unsure or wrong.</p>" + "".join(cards) + "</body></html>")
