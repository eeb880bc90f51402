"""Metrics against hand-computed examples and independent implementations (torchmetrics, smp.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semiseg.evaluation.metrics import (
    ConfusionMatrix,
    ForegroundScores,
    confusion_matrices,
    summarize_sets,
)

# target / pred of the 3-class hand example; the 255 pixel is ignored whatever is predicted there.
TARGET = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [1, 0, 2]], dtype=np.uint8)


def test_confusion_matrix_hand_example() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    # (truth, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); (255,2) ignored.
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert cm.matrix.dtype == np.int64
    assert cm.total == 5
    # IoU_c = TP / (row + col - TP): 1/(2+2-1), 2/(2+3-2), 0/(1+0-0)
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # correct pixels 1 + 2 + 0 out of 5 scored
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)
    # Dice_c = 2TP / (row + col): 2/4, 4/5, 0/1
    np.testing.assert_allclose(cm.dice(), [0.5, 0.8, 0.0])


def test_absent_class_rule() -> None:
    cm = ConfusionMatrix(4)  # class 3 appears in neither prediction nor truth
    cm.update(torch.from_numpy(PRED), torch.from_numpy(TARGET))
    iou = cm.iou()
    assert math.isnan(iou[3]) and math.isnan(cm.dice()[3])
    # exclude (nanmean, ST++): (1/3 + 2/3 + 0) / 3; zero (GTA/UniMatch +1e-10): same sum / 4
    assert cm.miou() == pytest.approx(1 / 3)
    assert cm.miou(absent="zero") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        cm.miou(absent="bogus")  # type: ignore[arg-type]


def test_predicted_but_absent_from_truth_is_zero_not_nan() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 2]), np.array([0, 0]))
    # class 0: 1/(2+1-1) = 0.5; class 1: absent from both -> NaN; class 2: 0/(0+1-0) = 0
    iou = cm.iou()
    assert iou[0] == pytest.approx(0.5) and math.isnan(iou[1]) and iou[2] == 0.0
    assert cm.miou() == pytest.approx(0.25)


def test_accumulate_merge_and_errors() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, size=(3, 8, 9)).astype(np.uint8)
    t[rng.random(t.shape) < 0.1] = 255
    p = rng.integers(0, 4, size=(3, 8, 9))
    whole = ConfusionMatrix(4)
    whole.update(p, t)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(p[0], t[0])
    b.update(torch.from_numpy(p[1:]), torch.from_numpy(t[1:]))
    assert np.array_equal(a.merge(b).matrix, whole.matrix)
    per_image = confusion_matrices(p, t, 4)
    assert per_image.shape == (3, 4, 4) and np.array_equal(per_image.sum(0).numpy(), whole.matrix)
    assert whole.total == int((t != 255).sum())
    with pytest.raises(ValueError, match="label 7"):
        whole.update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="shape"):
        whole.update(np.zeros((2, 2), np.int64), np.zeros((2, 3), np.uint8))
    with pytest.raises(TypeError):
        whole.update(np.zeros(3, np.float32), np.zeros(3, np.uint8))
    empty = ConfusionMatrix(2)
    assert empty.total == 0 and math.isnan(empty.pixel_accuracy()) and math.isnan(empty.miou())


def test_agrees_with_torchmetrics_on_random_data() -> None:
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(1)
    c = 5
    target = torch.randint(0, c, (6, 17, 23), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.15] = 255
    pred = torch.randint(0, c, (6, 17, 23), generator=g)
    cm = ConfusionMatrix(c)
    cm.update(pred, target)
    ref_iou = tm.MulticlassJaccardIndex(num_classes=c, average="none", ignore_index=255)(pred, target)
    np.testing.assert_allclose(cm.iou(), ref_iou.double().numpy(), rtol=1e-6)
    ref_acc = tm.MulticlassAccuracy(num_classes=c, average="micro", ignore_index=255)(pred, target)
    assert cm.pixel_accuracy() == pytest.approx(float(ref_acc), rel=1e-6)
    ref_f1 = tm.MulticlassF1Score(num_classes=c, average="none", ignore_index=255)(pred, target)
    np.testing.assert_allclose(cm.dice(), ref_f1.double().numpy(), rtol=1e-6)
    ref_cm = tm.MulticlassConfusionMatrix(num_classes=c, ignore_index=255)(pred, target)
    assert np.array_equal(cm.matrix, ref_cm.numpy())


def _foreground_batch() -> tuple[np.ndarray, np.ndarray]:
    t = np.zeros((4, 2, 4), np.uint8)
    p = np.zeros((4, 2, 4), np.uint8)
    t[0, 0, :] = 1            # A: truth = top row (4 px)
    p[0, 0, :2] = 1           #    pred = 2 px of it + 1 px below -> TP 2, FP 1, FN 2
    p[0, 1, 0] = 1
    # B: both empty
    p[2, 0, :2] = 1           # C: truth empty, pred 2 px -> TP 0, FP 2, FN 0
    t[3, 0, 0] = 1            # D: truth 1 px, pred empty -> TP 0, FP 0, FN 1
    return p, t


def test_foreground_per_image_and_pooled_hand_example() -> None:
    p, t = _foreground_batch()
    fs = ForegroundScores()
    fs.update(p, t, stems=["A", "B", "C", "D"], subsets=["s1", "s1", "s1", "s2"])
    dice = [r.dice for r in fs.records]
    iou = [r.iou for r in fs.records]
    # A: Dice 2*2/(2*2+1+2) = 4/7, IoU 2/(2+1+2) = 2/5; B both empty -> 1, 1; C and D one empty -> 0, 0
    np.testing.assert_allclose(dice, [4 / 7, 1, 0, 0])
    np.testing.assert_allclose(iou, [2 / 5, 1, 0, 0])
    s = fs.summary()
    assert s["dice"] == pytest.approx((4 / 7 + 1) / 4)      # 11/28
    assert s["iou"] == pytest.approx((2 / 5 + 1) / 4)       # 7/20
    # pooled: TP 2, FP 1+2 = 3, FN 2+1 = 3 -> Dice 4/10, IoU 2/8
    assert s["dice_pooled"] == pytest.approx(0.4)
    assert s["iou_pooled"] == pytest.approx(0.25)
    assert s["n_images"] == 4
    sub = fs.by_subset()
    # s1 = {A, B, C}: Dice (4/7 + 1 + 0)/3 = 11/21; s2 = {D}: 0
    assert sub["s1"]["dice"] == pytest.approx(11 / 21) and sub["s2"]["dice"] == 0.0
    total = summarize_sets(sub)["mean"]
    assert total["dice"] == pytest.approx((11 / 21 + 0) / 2)  # mean of set means, 11/42 != 11/28
    assert total["n_images"] == 4


def test_foreground_ignores_255_and_single_image() -> None:
    fs = ForegroundScores(foreground=1)
    t = np.array([[1, 255], [0, 0]], np.uint8)
    p = np.array([[1, 1], [0, 0]], np.uint8)   # the fg prediction on the 255 pixel is not a FP
    fs.update(p, t, stems="one")
    r = fs.records[0]
    assert (r.tp, r.fp, r.fn, r.dice, r.iou, r.stem) == (1, 0, 0, 1.0, 1.0, "one")
    assert math.isnan(ForegroundScores().summary()["dice"])


def test_foreground_agrees_with_smp_metrics() -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    g = torch.Generator().manual_seed(2)
    target = (torch.rand(10, 12, 14, generator=g) < 0.3).long()
    pred = (torch.rand(10, 12, 14, generator=g) < 0.3).long()
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    target[0] = 0                     # both empty
    pred[0] = 0
    target[1] = 0                     # truth empty, prediction not
    pred[2] = 0                       # prediction empty, truth not
    fs = ForegroundScores()
    fs.update(pred, target)
    tp, fp, fn, tn = smp.metrics.get_stats(pred, target, mode="multiclass", num_classes=2, ignore_index=255)
    tp, fp, fn, tn = (v[:, 1:] for v in (tp, fp, fn, tn))
    s = fs.summary()
    for name, fn_ in (("iou", smp.metrics.iou_score), ("dice", smp.metrics.f1_score)):
        per_image = fn_(tp, fp, fn, tn, reduction="micro-imagewise", zero_division=1.0)
        pooled = fn_(tp, fp, fn, tn, reduction="micro", zero_division=1.0)
        assert s[name] == pytest.approx(float(per_image), rel=1e-6)
        assert s[f"{name}_pooled"] == pytest.approx(float(pooled), rel=1e-6)


def test_summarize_sets() -> None:
    res = {
        "a": {"dice": 0.5, "n_images": 2, "per_class_iou": {"x": 0.2, "y": 0.4}, "name": "A"},
        "b": {"dice": 0.7, "n_images": 3, "per_class_iou": {"x": math.nan, "y": 0.6}, "name": "B"},
    }
    out = summarize_sets(res)
    assert out["per_set"]["a"]["dice"] == 0.5
    m = out["mean"]
    assert m["dice"] == pytest.approx(0.6) and m["n_images"] == 5
    assert m["per_class_iou"] == pytest.approx({"x": 0.2, "y": 0.5})  # NaN: undefined there, skipped
    assert "name" not in m


def test_all_reduce_without_distributed_is_noop() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    before = cm.matrix.copy()
    assert np.array_equal(cm.all_reduce().matrix, before)
    fs = ForegroundScores()
    fs.update(*_foreground_batch())
    assert len(fs.all_gather().records) == 4


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(3)
        cm.update(PRED if rank == 0 else TARGET.clip(0, 2), TARGET)
        fs = ForegroundScores()
        fs.update(*_foreground_batch(), stems=[f"r{rank}-{i}" for i in range(4)])
        cm.all_reduce()
        fs.all_gather()
        if rank == 0:
            np.save(out, cm.matrix)
            with open(out + ".txt", "w") as f:
                f.write(",".join(r.stem or "" for r in fs.records))
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_two_ranks(tmp_path) -> None:
    mp = pytest.importorskip("torch.multiprocessing")
    out = str(tmp_path / "cm.npy")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
    # rank 0 adds the hand example, rank 1 a perfect prediction (diag 2, 2, 1) of the same target
    assert np.load(out).tolist() == [[1 + 2, 1, 0], [0, 2 + 2, 0], [1, 0, 0 + 1]]
    stems = open(out + ".txt").read().split(",")
    assert stems == [f"r{r}-{i}" for r in range(2) for i in range(4)]
