"""Run and comparison reports: structure, embedded images, numbers equal results.json, size, rendering."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from semiseg.data.classes import ClassTable
from semiseg.report import figures
from semiseg.report.compare import gap_recovered, mean_std, write_compare_report
from semiseg.report.gallery import pick_cases
from semiseg.report.html import Markup, h, num, table
from semiseg.report.run_report import MAX_GALLERY, RUN_REPORT_BUDGET, THUMB_PX, write_run_report

SECTIONS = ("summary", "config", "curves", "pseudo-labels", "gallery", "per-class")


class Page(HTMLParser):
    """Collects ids, images, links, scripts and the metric cells (data-key -> (data-value, text))."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: list[dict[str, str]] = []
        self.refs: list[str] = []
        self.scripts = 0
        self.cells: dict[str, tuple[str | None, str]] = {}
        self.gallery_tags: list[str] = []
        self._cell: tuple[str, str | None] | None = None
        self._text: list[str] = []
        self._b = False
        self._text_b: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag == "script":
            self.scripts += 1
        for k in ("href", "src"):
            if k in a and not a[k].startswith(("#", "data:")):
                self.refs.append(a[k])
        if tag == "link":
            self.refs.append(a.get("href", ""))
        if tag == "td" and "data-key" in a:
            self._cell, self._text = (a["data-key"], a.get("data-value")), []
        if tag == "b":
            self._b, self._text_b = True, []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text.append(data)
        if self._b:
            self._text_b.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells[self._cell[0]] = (self._cell[1], "".join(self._text))
            self._cell = None
        if tag == "b" and self._b:
            self._b = False
            word = "".join(self._text_b)
            if word in ("best", "median", "worst"):
                self.gallery_tags.append(word)


def _results_value(results: dict, key: str) -> object:
    node: object = results
    for part in key.split("."):
        assert isinstance(node, dict) and part in node, f"{key}: not in results.json"
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------ fixtures
UNLABELED_COVERAGE = 0.75  # the fake round leaves the bottom quarter of every label unselected


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real supervised run on synthetic data, plus two fake pseudo-label rounds in its stage dir."""
    import torch

    from semiseg import api
    from semiseg.api import config_from_dict
    from semiseg.pseudo.store import PseudoLabelStore

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("report")
    cfg = config_from_dict({
        "name": "tiny", "out_dir": str(tmp / "runs"),
        "data": {"size": [48, 48], "options": {"n": 60}, "cache_dir": str(tmp / "cache"),
                 "benchmark_gt": True},
        "model": {"decoder_channels": [16, 16, 16, 8, 8]},
        "train": {"steps": 20, "eval_every": 10, "batch_size": 4, "progress": False, "threads": 1},
    })
    api.run(cfg, log=lambda *_: None)
    run = tmp / "runs" / "tiny"
    stage = next((run / "stages").iterdir())
    splits = {n: (run / "splits" / f"{n}.txt").read_text().split() for n in ("unlabeled", "test")}
    stems = splits["unlabeled"][:5] + splits["test"][:1]  # one test image, to show in the gallery
    store = PseudoLabelStore(stage / "pseudo-rounds")
    for k, name in enumerate(("round-1", "round-2")):
        with store.writer(name, {"policy": {"name": "fake", "params": {"k": k}}},
                          previous="round-1" if k else None, num_classes=2) as w:
            for i, stem in enumerate(stems):
                label = np.zeros((48, 48), np.uint8)
                label[:, : 12 + 4 * i + 8 * k] = 1
                label[36:] = 255
                conf = np.full((48, 48), 0.6 + 0.05 * i, np.float32)
                w.add(stem, label, conf)
    return run


@pytest.fixture(scope="module")
def report(run_dir: Path) -> tuple[Path, float]:
    t0 = time.time()
    path = write_run_report(run_dir)
    return path, time.time() - t0


# --------------------------------------------------------------------------------------- run report
def test_report_is_one_self_contained_file(report: tuple[Path, float], run_dir: Path) -> None:
    path, _ = report
    assert path == run_dir / "report.html"
    page = Page(path.read_text(encoding="utf-8"))
    assert set(SECTIONS) <= page.ids
    assert page.scripts == 0 and page.refs == []
    assert "re-evaluation gives" not in path.read_text()  # the gallery's own scoring reproduces the headline
    assert len(page.imgs) > 10
    for a in page.imgs:
        im = figures.decode_data_uri(a["src"])
        assert im.size[0] > 0 and im.size[1] > 0
        if a.get("class") != "fig":  # thumbnails, not charts
            assert max(im.size) <= THUMB_PX


def test_numbers_equal_results_json(report: tuple[Path, float], run_dir: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    page = Page(report[0].read_text(encoding="utf-8"))
    keys = [k for k in page.cells if k.startswith(("test.", "val."))]
    classes = list(results["test"]["per_class_iou"])
    must = {"test.headline", "test.dice", "test.miou", *[f"test.per_class_iou.{c}" for c in classes],
            *[f"val.{k}" for k in results["val"]]}
    assert must <= set(keys)
    for key in keys:
        exact, shown = page.cells[key]
        expected = _results_value(results, key)
        assert exact is not None and float(exact) == expected, key
        assert shown == f"{expected:.4f}", key


def test_pseudo_label_statistics(report: tuple[Path, float], run_dir: Path) -> None:
    page = Page(report[0].read_text(encoding="utf-8"))
    cov = {k: float(v) for k, (v, _) in page.cells.items() if k.endswith(".coverage")}
    assert sorted(k.split(".")[2] for k in cov) == ["round-1", "round-2"]
    assert all(v == pytest.approx(UNLABELED_COVERAGE) for v in cov.values())
    flips = {k.split(".")[2]: v for k, (v, _) in page.cells.items() if k.endswith(".flip_rate")}
    assert flips["round-1"] is None
    # round 2 widens every object by 8 columns over 36 selected rows: 8 * 36 flipped of 48 * 36 compared
    assert float(flips["round-2"]) == pytest.approx(8 / 48)
    text = report[0].read_text(encoding="utf-8")
    assert "pseudo label of" in text  # the test image with a pseudo label shows it in the gallery
    assert 'alt="pseudo of ' in text  # examples of unlabeled images in the pseudo-label section


def test_gallery_best_median_worst(run_dir: Path, tmp_path: Path) -> None:
    from semiseg.api import load_run
    from semiseg.evaluation.evaluator import evaluate_source

    path = write_run_report(run_dir, out=tmp_path / "r.html", max_gallery=3)
    page = Page(path.read_text(encoding="utf-8"))
    assert page.gallery_tags == ["best", "median", "worst"]
    ctx, model = load_run(run_dir)
    res = evaluate_source(model, ctx.source, ctx.splits.test, protocol=ctx.config.eval.protocol,
                          size=tuple(ctx.config.data.size), device="cpu")
    dice = sorted(r["dice"] for r in res.per_image)
    text = path.read_text(encoding="utf-8")
    assert f"dice {dice[-1]:.4f}" in text and f"dice {dice[0]:.4f}" in text


def test_size_and_time_budget(report: tuple[Path, float]) -> None:
    path, seconds = report
    assert path.stat().st_size <= RUN_REPORT_BUDGET
    assert seconds < 30


def test_report_without_data_keeps_numbers(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "moved"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report.html"))
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["source"] = str(tmp_path / "no-such-folder")
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = write_run_report(copy).read_text(encoding="utf-8")
    assert "pictures unavailable" in text
    results = json.loads((copy / "results.json").read_text())
    assert float(Page(text).cells["test.headline"][0]) == results["test"]["headline"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_renders_in_headless_chromium(report: tuple[Path, float], tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    cmd = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2000", report[0].resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    a = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert a.shape[:2] == (2000, 1200)
    assert a.var() > 100  # text, tables and pictures, not a blank page
    assert (a.min(-1) < 200).mean() > 0.02


# ---------------------------------------------------------------------------------- compare report
@pytest.fixture
def compare_runs(run_dir: Path, tmp_path: Path):  # noqa: ANN201 - yields a list of run dirs
    """Copies of the real run with fabricated headlines: supervised 0.4 / 0.6, oracle 0.9, fake 0.6 / 0.8."""
    from semiseg.methods import registry
    from semiseg.methods.registry import Method, MethodOptions, register
    from semiseg.methods.supervised import train_supervised

    class FakeSemi(Method[MethodOptions]):
        name = "report-test-fake"

        def plan(self, pipeline) -> None:  # noqa: ANN001 - the supervised stage's model is what it delivers
            train_supervised(pipeline)

    register(FakeSemi)
    dirs = []
    spec = [("supervised", 0, 0.4), ("supervised", 1, 0.6), ("oracle", 0, 0.9), ("report-test-fake", 0, 0.6),
            ("report-test-fake", 1, 0.8)]
    for method, seed, value in spec:
        d = tmp_path / "bench" / f"{method}-{seed}"
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("report.html", "last.pt"))
        if method == "oracle":
            (d / "stages" / "0-supervised").rename(d / "stages" / "0-oracle")
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["method"] = {"name": method}
        cfg["split"]["seed"] = seed
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        fingerprint = json.loads((d / "fingerprint.json").read_text())  # fabricated runs: their record agrees
        fingerprint["config"].update(method=cfg["method"], split=cfg["split"])
        (d / "fingerprint.json").write_text(json.dumps(fingerprint))
        res = json.loads((d / "results.json").read_text())
        res.update(method=method, split_seed=seed, name=d.name)
        res["test"]["headline"] = res["test"]["dice"] = value
        (d / "results.json").write_text(json.dumps(res))
        dirs.append(d)
    yield dirs
    registry._REGISTRY.pop(FakeSemi.name, None)


def test_compare_table_gain_and_gap(compare_runs: list[Path]) -> None:
    path = write_compare_report(compare_runs)
    assert path == compare_runs[0].parent / "compare.html"
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.scripts == 0 and page.refs == []
    cells = {k.split("|", 1)[1]: v for k, v in page.cells.items() if "|" in k and not k.startswith("run|")}
    assert float(cells["supervised|headline"][0]) == pytest.approx(0.5)
    assert "± 0.1414" in cells["supervised|headline"][1]
    assert float(cells["report-test-fake|headline"][0]) == pytest.approx(0.7)
    assert float(cells["report-test-fake|gain"][0]) == pytest.approx(0.2)
    assert float(cells["report-test-fake|gap_recovered"][0]) == pytest.approx(0.5)
    assert cells["oracle|headline"][1] == "0.9000"  # one run: no std
    assert int(cells["report-test-fake|runs"][0]) == 2
    order = [k.split("|")[0] for k in cells if k.endswith("|runs")]
    assert order == ["supervised", "report-test-fake", "oracle"]  # reference rows first and last
    # side by side: the same images for the three methods, each prediction an embedded thumbnail
    preds = [a["alt"] for a in page.imgs if " prediction of " in a.get("alt", "")]
    stems = {alt.split(" prediction of ")[1] for alt in preds}
    assert len(preds) == 3 * len(stems) and 1 <= len(stems) <= 6
    for a in page.imgs:
        figures.decode_data_uri(a["src"])
    assert path.stat().st_size <= 5 * 1024 * 1024


def test_mean_std_and_gap_formulas() -> None:
    m, s = mean_std([0.6, 0.8])
    assert m == pytest.approx(0.7) and s == pytest.approx(math.sqrt(0.02))
    assert mean_std([0.3]) == (0.3, None) and mean_std([]) == (None, None)
    assert gap_recovered(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert gap_recovered(0.7, 0.5, 0.5) is None and gap_recovered(None, 0.5, 0.9) is None
    assert gap_recovered(0.7, 0.5, 0.4) is None  # the oracle does not beat supervised: no gap


# ------------------------------------------------------------------------------------- components
def test_pick_cases_by_hand() -> None:
    recs = [{"stem": f"s{i}", "subset": None, "dice": d} for i, d in
            enumerate([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, None])]
    cases = pick_cases(recs, "dice", 6)
    # ascending: s2 .1, s6 .2, s4 .3, s8 .4, s0 .5, s7 .6, s3 .7, s5 .8, s1 .9 -> two of each third,
    # the median pair at positions 3-4 of 9 (around 9 // 2)
    assert [(c.stem, c.tag, c.score) for c in cases] == [
        ("s1", "best", 0.9), ("s5", "best", 0.8), ("s0", "median", 0.5), ("s8", "median", 0.4),
        ("s6", "worst", 0.2), ("s2", "worst", 0.1)]
    assert len(pick_cases(recs, "dice", 20)) == 9  # every scored image when there are fewer
    assert pick_cases(recs, "dice", 0) == []


def test_overlay_and_error_colours() -> None:
    binary = ClassTable.binary("polyp")
    image = np.full((2, 2, 3), 100, np.uint8)
    label = np.array([[0, 1], [255, 1]], np.uint8)
    out = figures.overlay(image, label, binary, alpha=0.5)
    assert (out[0, 0] == 100).all()  # background untouched
    assert tuple(out[0, 1]) == tuple(round(0.5 * 100 + 0.5 * c) for c in figures.BINARY_OBJECT_COLOR)
    pred = np.array([[1, 1], [0, 0]], np.uint8)
    gt = np.array([[1, 0], [1, 255]], np.uint8)
    err = figures.error_map(image, pred, gt, binary)
    assert tuple(err[0, 0]) == figures.TP_COLOR and tuple(err[0, 1]) == figures.FP_COLOR
    assert tuple(err[1, 0]) == figures.FN_COLOR and tuple(err[1, 1]) == figures.IGNORE_COLOR
    assert figures.thumb_size((600, 300), 160) == (160, 80) and figures.thumb_size((40, 30), 160) == (40, 30)


def test_html_escapes_text_and_attributes() -> None:
    cell = h("td", "<script>alert(1)</script>", title='a"b')
    assert "<script>" not in cell and "&lt;script&gt;" in cell and 'title="a&quot;b"' in cell
    assert h("p", Markup("<b>x</b>")) == "<p><b>x</b></p>"
    assert num(0.123456, "k") == '<td class="num" data-key="k" data-value="0.123456">0.1235</td>'
    assert num(None) == '<td class="num">—</td>'
    t = table(("a",), [["<x>"]])
    assert "&lt;x&gt;" in t


def test_default_budget_constants() -> None:
    assert THUMB_PX <= 160 and MAX_GALLERY <= 12 and RUN_REPORT_BUDGET <= 3 * 1024 * 1024


def test_two_variants_of_one_method_are_labelled_by_what_differs(tmp_path):
    from semiseg.report.compare import group_runs
    from semiseg.report.rundata import RunInfo

    def run(name: str, method: dict) -> RunInfo:
        config = {"data": {"source": "polyp", "size": [64, 64]}, "split": {"labeled": 0.05}, "method": method}
        return RunInfo(tmp_path / name, {"method": method["name"], "name": name}, config, {}, [])

    runs = [run("a", {"name": "dst-cbc", "ratios": [0.2, 1.0]}), run("b", {"name": "dst-cbc", "ratios": [1.0, 1.0]}),
            run("c", {"name": "supervised"}), run("d", {"name": "dst-cbc", "ratios": [0.2, 1.0]})]
    (_, groups), = group_runs(runs).values()
    assert [(g.label, len(g.runs)) for g in groups] == [
        ("supervised", 1), ("dst-cbc", 2), ("dst-cbc (ratios=[1.0, 1.0])", 1)]
