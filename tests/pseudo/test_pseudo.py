"""Pseudo labelling: selection policies, ST++ stability, the TTA labeler and the pseudo-label store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.atomic import writer_tag
from semiseg.data.transforms import to_input
from semiseg.errors import DataError
from semiseg.pseudo.labeler import Labeler
from semiseg.pseudo.policies import (
    ClassBalanced,
    ConfidenceWeights,
    DropLowest,
    FixedThreshold,
    SelectAll,
    split_reliable,
    stability_scores,
)
from semiseg.pseudo.store import PseudoLabelStore, make_provenance

SRC = Path(__file__).resolve().parents[2] / "src"


def probs_from(columns: list[tuple[int, float]], c: int = 3) -> np.ndarray:
    """C×1×N probabilities: pixel j has argmax cls_j with max prob m_j, the rest split evenly."""
    out = np.zeros((c, 1, len(columns)), dtype=np.float32)
    for j, (cls, m) in enumerate(columns):
        out[:, 0, j] = (1 - m) / (c - 1)
        out[cls, 0, j] = m
    return out


# ------------------------------------------------------------------------------------------- policies
def test_select_all_threshold_drop_lowest() -> None:
    p = probs_from([(0, 0.9), (1, 0.6), (2, 0.7), (1, 0.8), (0, 0.55)])
    label, conf = SelectAll()(p)
    assert label.tolist() == [[0, 1, 2, 1, 0]] and label.dtype == np.uint8
    assert np.allclose(conf, [[0.9, 0.6, 0.7, 0.8, 0.55]])
    assert FixedThreshold(0.7)(p)[0].tolist() == [[0, 255, 2, 1, 255]]  # >= 0.7 kept
    # 20th percentile of .55 .6 .7 .8 .9 = .59: only .55 is dropped (<=)
    assert DropLowest(20)(p)[0].tolist() == [[0, 1, 2, 1, 255]]
    # a batch B×C×H×W: the percentile is over the whole batch (40 %: .66 drops .55 and .6)
    batch = np.stack([p, p])
    assert DropLowest(40)(batch)[0].tolist() == [[[0, 255, 2, 1, 255]]] * 2
    # fitted on the set: a fixed threshold (the 80th percentile of the set = .82)
    fitted = DropLowest(80).fit([p])
    assert fitted.threshold == pytest.approx(0.82)
    assert fitted(p[:, :, :2])[0].tolist() == [[0, 255]]
    assert SelectAll().params() == {} and FixedThreshold(0.5).params() == {"threshold": 0.5}
    # online (inside a training step, on torch): the same per-batch rule, ignored pixels left out of the percentile
    label, _ = DropLowest(40).on_tensor(torch.as_tensor(batch))
    assert label.tolist() == [[[0, 255, 2, 1, 255]]] * 2 and label.dtype == torch.long
    conf = torch.tensor([[0.9, 0.6, 0.7, 0.8, 0.55]])
    valid = torch.tensor([[True, True, True, True, False]])  # .55 already ignored: 20th pct of the rest = .62
    assert DropLowest(20).dropped(conf, valid).tolist() == [[False, True, False, False, False]]


def test_confidence_weights_code_and_paper_forms() -> None:
    conf = torch.tensor([0.9, 0.6, 0.7, 0.5])
    dropped = torch.tensor([False, True, False, False])
    valid = torch.tensor([True, True, True, False])
    # code: c + 1 everywhere, dropped pixels at c = 0, the ignored one keeps its c (or 0 when counted as dropped)
    assert ConfidenceWeights()(conf, dropped, valid).tolist() == pytest.approx([1.9, 1.0, 1.7, 1.5])
    assert ConfidenceWeights(ignored_count_as_dropped=True)(conf, dropped, valid).tolist() == \
        pytest.approx([1.9, 1.0, 1.7, 1.0])
    # paper (tau = 1): c + tau on kept pixels only
    assert ConfidenceWeights(1.0)(conf, dropped, valid).tolist() == pytest.approx([1.9, 0.0, 1.7, 0.0])


# sampled max probs: class 0: .5 .6 .7 .8 .9 (5), class 1: .95 .65 (2), class 2: none
CBC_PIXELS = [(0, 0.5), (0, 0.6), (0, 0.7), (0, 0.8), (0, 0.9), (1, 0.95), (1, 0.65)]


def test_class_balanced_thresholds_hand() -> None:
    p = probs_from(CBC_PIXELS)
    cbc = ClassBalanced(0.4, sample_stride=1).fit([p])
    # k0 = sorted0[-int(5·.4) - 1] = sorted0[-3] = .7; k1 = sorted1[-int(.8) - 1] = sorted1[-1] = .95
    # class 2 is empty: no crash, k2 = just above 1
    assert cbc.sample_counts == [5, 2, 0]
    assert np.allclose(cbc.thresholds[:2], [0.7, 0.95]) and cbc.thresholds[2] > 1.0
    # legacy: argmax p/k, 255 where max(p/k) < 1: .7/.7 = 1 kept; .65/.95 < 1 dropped
    assert cbc(p)[0].tolist() == [[255, 255, 0, 0, 0, 1, 255]]
    assert ClassBalanced(0.4, sample_stride=1, rule="threshold").fit([p])(p)[0].tolist() == \
        [[255, 255, 0, 0, 0, 1, 255]]
    # ratio >= 1: every class (the empty one too) gets 1e-4 -> everything labelled with its argmax
    full = ClassBalanced(1.0, sample_stride=1).fit([p])
    assert np.allclose(full.thresholds, 1e-4)
    assert full(p)[0].tolist() == [[0, 0, 0, 0, 0, 1, 1]]
    with pytest.raises(RuntimeError):
        ClassBalanced(0.5)(p)


def test_class_balanced_exact_quantile_and_stride() -> None:
    # 100 class-0 pixels with max prob .5 + i/200 (i = 0..99), C = 2; ratio .2:
    # k0 = sorted[-int(100·.2) - 1] = sorted[79] = .5 + 79/200 = .895 -> 21 pixels (>= k) selected
    vals = 0.5 + np.arange(100) / 200
    p = np.stack([vals, 1 - vals])[:, None, :].astype(np.float32)
    cbc = ClassBalanced(0.2, sample_stride=1, num_classes=2).fit([p])
    assert cbc.thresholds[0] == pytest.approx(0.895, abs=1e-6)
    assert int((cbc(p)[0] == 0).sum()) == 21
    # stride 16 over two fitted arrays: indices 0, 16, ..., 96 of each -> 7 + 7 samples of class 0
    strided = ClassBalanced(0.2, sample_stride=16).fit([p, p])
    assert strided.sample_counts == [14, 0]
    # sorted samples: each of .5 .58 .66 .74 .82 .9 .98 twice; k0 = sorted[-int(14·.2) - 1] = sorted[-3] = .9
    assert strided.thresholds[0] == pytest.approx(0.9, abs=1e-6)


def test_class_balanced_legacy_can_flip_argmax() -> None:
    cbc = ClassBalanced(0.5, rule="legacy")
    cbc.thresholds = np.array([0.3, 0.95], dtype=np.float32)
    p = np.array([0.4, 0.6], dtype=np.float32).reshape(2, 1, 1)
    # p/k = [1.33, 0.63]: legacy labels class 0 although the argmax is 1; the threshold rule drops it
    assert cbc(p)[0].tolist() == [[0]]
    cbc.rule = "threshold"
    assert cbc(p)[0].tolist() == [[255]]


def test_stability_scores_and_split() -> None:
    a_ref = np.array([[0, 0], [1, 1]])
    b_ref = np.array([[2, 2], [2, 255]])
    c_ref = np.ones((2, 2), dtype=np.int64)
    ckpt1 = [a_ref.copy(), np.array([[2, 2], [2, 0]]), c_ref.copy()]
    ckpt2 = [np.array([[0, 1], [1, 1]]), np.array([[0, 2], [2, 2]]), c_ref.copy()]
    scores = stability_scores([ckpt1, ckpt2, [a_ref, b_ref, c_ref]], num_classes=3)
    # A: ckpt1 identical -> 1; ckpt2: IoU0 = 1/2, IoU1 = 2/3, class 2 absent -> (1/2 + 2/3)/2 = 7/12
    # B: pixel (1,1) ignored; ckpt1 -> 1; ckpt2: IoU2 = 2/3, IoU0 = 0/1 -> 1/3
    # C: 1 and 1
    assert np.allclose(scores, [(1 + 7 / 12) / 2, (1 + 1 / 3) / 2, 1.0])
    reliable, unreliable = split_reliable(["a", "b", "c"], scores)
    assert reliable == ["c"] and unreliable == ["a", "b"]  # odd count: the extra one is unreliable
    # ties keep their order (stable descending), NaN sorts last
    rel, unrel = split_reliable(["a", "b", "c", "d", "e"], [0.5, 0.9, float("nan"), 0.9, 0.5])
    assert rel == ["b", "d"] and unrel == ["a", "e", "c"]


# -------------------------------------------------------------------------------------------- labeler
class ModeRecorder(nn.Module):
    """A 1×1 conv (pointwise, so flip-equivariant) that records its mode and the batch sizes it sees."""

    def __init__(self, c: int = 3, divisor: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, c, 1)
        self.divisor = divisor
        self.modes: list[bool] = []
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise RuntimeError(f"size {tuple(x.shape[-2:])} not divisible by {self.divisor}")
        self.modes.append(self.training)
        self.batches.append(x.shape[0])
        return self.conv(x) * 3


def test_tta_flip_maps_back_exactly() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 7)
    model = ModeRecorder()
    single = Labeler(model).probs(x)
    assert torch.allclose(single.sum(1), torch.ones(2, 5, 7), atol=1e-6)
    raw = Labeler(model, flip=True, normalise=False).probs(x)
    assert torch.allclose(raw, 2 * single, atol=1e-6)  # a non-symmetric x: only right if flipped back
    assert torch.allclose(Labeler(model, flip=True).probs(x), single, atol=1e-6)


def test_tta_scales_match_st_plusplus_formula() -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 3, 8, 6)
    model = ModeRecorder()
    scales = (0.5, 1.0, 1.5)
    expected = torch.zeros(1, 3, 8, 6)
    interp = torch.nn.functional.interpolate
    with torch.no_grad():
        for s in scales:
            xs = interp(x, size=(int(8 * s), int(6 * s)), mode="bilinear", align_corners=True)
            for view in (xs, xs.flip(3)):
                p = model(view).softmax(1)
                p = p.flip(3) if view is not xs else p
                expected += interp(p, size=(8, 6), mode="bilinear", align_corners=True)
    raw = Labeler(model, scales=scales, flip=True, normalise=False).probs(x)
    assert torch.allclose(raw, expected, atol=1e-5)
    norm = Labeler(model, scales=scales, flip=True).probs(x)
    assert torch.allclose(norm, expected / 6, atol=1e-6)
    assert torch.equal(norm.argmax(1), raw.argmax(1))


def test_labeler_mode_and_size_divisor() -> None:
    model = ModeRecorder(divisor=4)
    model.train()
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(RuntimeError):
        Labeler(model).probs(x)
    model.modes.clear()
    out = Labeler(model, size_divisor=4).probs(x)
    assert out.shape == (1, 3, 6, 6) and model.modes == [False] and model.training  # restored
    Labeler(model, size_divisor=4, train_mode=True).probs(x)
    assert model.modes[-1] is True


def test_iter_predictions_streams_with_indices() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 6, 3), dtype=np.uint8)
    model = ModeRecorder()
    lab = Labeler(model, batch_size=2)
    it = lab.iter_predictions(images, indices=[4, 0, 2])
    first = next(it)
    assert model.batches == [2]  # lazy: one batch predicted so far
    rest = list(it)
    assert model.batches == [2, 1]
    got = [first, *rest]
    assert [i for i, _ in got] == [4, 0, 2]
    for i, p in got:
        assert p.shape == (3, 4, 6) and p.dtype == np.float32
        ref = lab.probs(to_input(images[i])[None])[0].numpy()
        assert np.allclose(p, ref, atol=1e-6)
    assert len(list(lab.iter_predictions(images))) == 5


# ---------------------------------------------------------------------------------------------- store
L1 = np.array([[0, 1], [255, 1]], dtype=np.uint8)
C1 = np.array([[0.52, 1.0], [0.22, 0.91]])
L2 = np.array([[255, 255], [0, 0]], dtype=np.uint8)
C2 = np.array([[0.12, 0.33], [0.61, 0.77]])
STEMS = ["kvasir-seg/abc 1", "cvc/x/y"]


def write_round(store: PseudoLabelStore, name: str = "r0", **kw: object) -> None:
    with store.writer(name, {"policy": {"name": "all"}}, num_classes=2, **kw) as w:
        w.add(STEMS[0], L1, C1)
        w.add(STEMS[1], L2, C2)


def test_store_round_trip_and_stats(tmp_path: Path) -> None:
    store = PseudoLabelStore(tmp_path)
    write_round(store)
    assert store.rounds() == ["r0"]
    r = store.load("r0")
    assert r.stems == STEMS
    assert np.array_equal(r.labels(STEMS[0]), L1) and np.array_equal(r.labels(STEMS[1]), L2)
    assert np.abs(r.confidence(STEMS[1]) - C2).max() <= 0.5 / 255 + 1e-7
    assert sorted(os.listdir(r.path / "labels")) == ["0.png", "1.png"]
    assert np.array_equal(r.labels_array(), np.stack([L1, L2]))
    out = np.lib.format.open_memmap(tmp_path / "mm.npy", mode="w+", dtype=np.uint8, shape=(1, 2, 2))
    r.labels_array([STEMS[1]], out=out)
    assert np.array_equal(out[0], L2)
    assert r.provenance["policy"] == {"name": "all"}
    s = r.stats
    assert s == json.loads((r.path / "stats.json").read_text())
    assert s["num_images"] == 2 and s["num_pixels"] == 8 and s["selected_pixels"] == 5
    assert s["coverage"] == pytest.approx(5 / 8)
    assert s["class_pixels"] == [3, 2] and s["class_share"] == pytest.approx([0.6, 0.4])
    # (.52 + 1 + .22 + .91 + .12 + .33 + .61 + .77) / 8 and (.52 + 1 + .91 + .61 + .77) / 5
    assert s["mean_confidence"] == pytest.approx(4.48 / 8)
    assert s["mean_confidence_selected"] == pytest.approx(3.81 / 5)
    counts = [0] * 20
    for b in (10, 19, 4, 18, 2, 6, 12, 15):  # bins of width .05; 1.0 falls in the last bin
        counts[b] += 1
    assert s["confidence_histogram"]["counts"] == counts
    assert s["flip_rate"] is None and s["quality"] is None
    with pytest.raises(DataError):
        r.labels("unknown")


def test_store_flip_rate_and_gt_quality(tmp_path: Path) -> None:
    store = PseudoLabelStore(tmp_path)
    with store.writer("r0", {}, num_classes=2) as w:
        w.add(STEMS[0], np.array([[1, 1], [0, 1]], dtype=np.uint8), np.ones((2, 2)))
        w.add(STEMS[1], np.array([[0, 255], [0, 1]], dtype=np.uint8), np.ones((2, 2)))
    gt = {STEMS[0]: np.array([[0, 1], [1, 0]], np.uint8), STEMS[1]: np.array([[0, 0], [255, 0]], np.uint8)}
    write_round(store, "r1", previous="r0", ground_truth=gt.__getitem__)
    s = store.load("r1").stats
    # image 1: pixels labelled in both (0,0) 0/1 changed, (0,1) same, (1,1) same -> 3 compared, 1 flip
    # image 2: (1,0) 0/0 same, (1,1) 0 vs 1 changed -> 2 compared, 1 flip; total 2 / 5
    assert s["flip_rate"] == pytest.approx(0.4) and s["flip_compared_pixels"] == 5
    q = s["quality"]
    # selected pixels with GT: (0,0) 0/0, (0,1) 1/1, (1,1) pred 1 gt 0; image 2 (1,1) 0/0 ((1,0) has gt 255)
    # rows truth: [[2, 1], [0, 1]] -> IoU0 = 2/3, IoU1 = 1/2, accuracy 3/4
    assert q["per_class_iou"] == pytest.approx([2 / 3, 1 / 2]) and q["miou"] == pytest.approx(7 / 12)
    assert q["pixel_accuracy"] == pytest.approx(0.75) and q["scored_pixels"] == 4
    # foreground Dice per image: image 1 tp 1 fp 1 fn 0 -> 2/3; image 2 nothing either side -> 1
    assert q["foreground_dice"] == pytest.approx((2 / 3 + 1) / 2)


def test_store_exception_leaves_no_round(tmp_path: Path) -> None:
    store = PseudoLabelStore(tmp_path)
    with pytest.raises(KeyError), store.writer("bad", {}) as w:
        w.add("a", L1, C1)
        raise KeyError("boom")
    assert store.rounds() == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(DataError):
        store.load("bad")
    # a half-finished round (killed between rename and DONE) and a live tmp dir are not rounds
    (tmp_path / "half" / "labels").mkdir(parents=True)
    (tmp_path / f".x.{writer_tag()}.live.tmp").mkdir()
    assert store.rounds() == []
    write_round(store, "half")  # the DONE-less directory is replaced
    assert store.rounds() == ["half"] and store.load("half").stems == STEMS
    with pytest.raises(FileExistsError):
        write_round(store, "half")
    with pytest.raises(DataError):
        with store.writer("dup", {}) as w:
            w.add("a", L1, C1)
            w.add("a", L1, C1)
    assert store.rounds() == ["half"]


def test_store_survives_sigkill(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        sys.path.insert(0, {str(SRC)!r})
        from pathlib import Path
        from semiseg.pseudo.store import PseudoLabelStore
        store = PseudoLabelStore(Path({str(tmp_path)!r}))
        with store.writer("r0", {{}}) as w:
            w.add("a", np.zeros((4, 4), np.uint8), np.ones((4, 4)))
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    store = PseudoLabelStore(tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".r0.w{proc.pid}h") and store.rounds() == []
    write_round(store, "r0")  # the dead writer's tmp dir is removed by the next write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r0"] and store.rounds() == ["r0"]


def test_make_provenance(tmp_path: Path) -> None:
    model = ModeRecorder()
    lab = Labeler(model, scales=(1.0, 1.5), flip=True)
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    prov = make_provenance(model=model, checkpoint=ckpt, policy=ClassBalanced(0.2), labeler=lab, round=1)
    assert len(prov["model_sha256"]) == 64 and prov["checkpoint"]["path"] == str(ckpt)
    assert prov["policy"]["name"] == "class_balanced" and prov["policy"]["params"]["ratio"] == 0.2
    assert prov["tta"]["scales"] == [1.0, 1.5] and prov["tta"]["views"] == 4 and prov["round"] == 1
    other = ModeRecorder()
    with torch.no_grad():
        other.conv.weight.add_(1)
    assert make_provenance(model=other)["model_sha256"] != prov["model_sha256"]
    store = PseudoLabelStore(tmp_path / "pl")
    with store.writer("r", prov) as w:
        w.add("s", L1, C1)
    assert store.load("r").provenance["tta"]["flip"] is True
