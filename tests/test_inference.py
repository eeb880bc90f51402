"""Inference protocols on models where the answer is known, and the evaluator on a tiny fake source."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from semiseg.data.cache import resize_image as cache_resize_image
from semiseg.data.classes import ClassTable
from semiseg.data.transforms import to_input
from semiseg.data.types import DataSource, Sample
from semiseg.errors import ConfigError, DataError
from semiseg.evaluation.evaluator import EvalResult, evaluate_arrays, evaluate_source, headline_metric
from semiseg.evaluation.inference import predict_batch, predict_probs, window_starts

torch.set_num_threads(1)


class Pointwise(nn.Module):
    """A 1×1 conv: each output pixel depends on its own input pixel only. Records input shapes."""

    def __init__(self, classes: int = 3, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            if weight is None:
                self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
                self.conv.bias.copy_(torch.randn(classes, generator=g))
            else:
                self.conv.weight.copy_(weight.reshape(classes, 3, 1, 1))
                self.conv.bias.zero_()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        return self.conv(x)


class WindowMean(nn.Module):
    """Logits = the window's mean colour at every pixel: a sliding-window result is an average of these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * x.mean(dim=(2, 3), keepdim=True).expand(-1, -1, *x.shape[-2:]).contiguous()


def _image(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _direct(model: nn.Module, image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.conv(torch.as_tensor(to_input(image))[None]).softmax(1)[0]


def test_window_starts() -> None:
    assert window_starts(37, 16, 10) == [0, 10, 20, 21]  # last window flush with the end: 37 - 16
    assert window_starts(32, 16, 16) == [0, 16]
    assert window_starts(10, 16, 10) == [0]


def test_whole_pads_to_divisor_and_matches_direct() -> None:
    model, image = Pointwise(), _image()
    pred = predict_probs(model, image, protocol="whole", num_classes=3)
    assert model.seen == [(1, 3, 64, 64)]  # 37×53 padded to multiples of 32
    assert pred.valid is None and pred.probs.shape == (3, 37, 53)
    torch.testing.assert_close(pred.probs, _direct(model, image), atol=1e-6, rtol=0)
    zero = predict_probs(model, image, protocol="whole", num_classes=3, pad_mode="zero")
    torch.testing.assert_close(zero.probs, pred.probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("window", "stride"), [((16, 16), (10, 10)), ((16, 24), None), ((64, 64), None)])
def test_sliding_window_equals_whole_for_pointwise_model(window, stride) -> None:
    model, image = Pointwise(), _image()
    whole = predict_probs(model, image, protocol="whole", num_classes=3).probs
    model.seen.clear()
    pred = predict_probs(model, image, protocol="sliding_window", window=window, stride=stride, num_classes=3)
    assert pred.probs.shape == (3, 37, 53) and pred.valid is None
    torch.testing.assert_close(pred.probs, whole, atol=1e-6, rtol=0)
    assert {s[2:] for s in model.seen} == {window}  # every window is full size (padded when too big)


def test_sliding_window_averages_summed_softmax() -> None:
    image = _image(20, 12)
    pred = predict_probs(WindowMean(), image, protocol="sliding_window", window=(8, 12), stride=(6, 12),
                         num_classes=3)
    # rows start at 0, 6, 12 (= 20 - 8); row r is covered by the windows whose span holds it
    x = torch.as_tensor(to_input(image))
    soft = [(4 * x[:, t:t + 8].mean(dim=(1, 2))).softmax(0) for t in (0, 6, 12)]
    for r, cover in ((0, [0]), (7, [0, 1]), (12, [1, 2]), (19, [2])):
        expected = sum(soft[i] for i in cover) / len(cover)
        torch.testing.assert_close(pred.probs[:, r, 5], expected, atol=1e-6, rtol=0)


def test_center_crop_matches_whole_inside_and_marks_valid() -> None:
    model, image = Pointwise(), _image()
    whole = predict_probs(model, image, protocol="whole", num_classes=3).probs
    model.seen.clear()
    pred = predict_probs(model, image, protocol="center_crop", size=(20, 24), num_classes=3)
    assert model.seen == [(1, 3, 20, 24)]
    # top = (37 - 20) // 2 = 8, left = (53 - 24) // 2 = 14
    expected = torch.zeros(37, 53, dtype=torch.bool)
    expected[8:28, 14:38] = True
    assert torch.equal(pred.valid, expected)
    torch.testing.assert_close(pred.probs[:, expected], whole[:, expected], atol=1e-6, rtol=0)
    assert float(pred.probs[:, ~expected].abs().sum()) == 0.0
    model.seen.clear()
    tall = predict_probs(model, image, protocol="center_crop", size=48, num_classes=3)  # taller than 37
    assert model.seen == [(1, 3, 48, 48)]
    assert int(tall.valid.sum()) == 37 * 48 and bool(tall.valid[:, 2:50].all())
    torch.testing.assert_close(tall.probs[:, tall.valid], whole[:, tall.valid], atol=1e-6, rtol=0)


def test_resize_returns_original_size() -> None:
    model, image = Pointwise(), _image()
    pred = predict_probs(model, image, protocol="resize", size=(32, 32), num_classes=3)
    assert model.seen == [(1, 3, 32, 32)]
    assert pred.probs.shape == (3, 37, 53) and pred.valid is None
    torch.testing.assert_close(pred.probs.sum(0), torch.ones(37, 53), atol=1e-5, rtol=0)
    flat = np.broadcast_to(np.array([200, 30, 90], np.uint8), (37, 53, 3)).copy()  # resizing changes nothing
    torch.testing.assert_close(predict_probs(model, flat, protocol="resize", size=32, num_classes=3).probs,
                               _direct(model, flat), atol=1e-5, rtol=0)


class Keep(nn.Module):
    """Returns its input as logits and keeps it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x.clone()
        return x


@pytest.mark.parametrize("size", [(20, 24), (48, 40), (48, 24)])
def test_resize_feeds_the_cache_resized_image(size) -> None:
    image = _image()
    model = Keep()
    predict_probs(model, image, protocol="resize", size=size, num_classes=3)
    # the model sees exactly the image the decoded cache would have given training
    torch.testing.assert_close(model.last[0], torch.as_tensor(to_input(cache_resize_image(image, *size))))


def test_predict_batch_and_amp() -> None:
    model = Pointwise()
    x = torch.stack([torch.as_tensor(to_input(_image(16, 16, s))) for s in range(2)])
    probs = predict_batch(model, x)
    assert probs.shape == (2, 3, 16, 16) and probs.dtype == torch.float32 and not probs.requires_grad
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 16, 16), atol=1e-6, rtol=0)
    torch.testing.assert_close(predict_batch(model, x, amp=True), probs, atol=3e-2, rtol=0)


def test_protocol_errors() -> None:
    model, image = Pointwise(), _image()
    with pytest.raises(ConfigError, match="protocol"):
        predict_probs(model, image, protocol="tiles", size=16, num_classes=3)
    with pytest.raises(ConfigError, match="size"):
        predict_probs(model, image, protocol="resize", num_classes=3)
    with pytest.raises(ConfigError, match="stride"):
        predict_probs(model, image, protocol="sliding_window", size=16, stride=20, num_classes=3)
    with pytest.raises(ValueError, match="channels"):
        predict_probs(model, image, protocol="whole", num_classes=2)
    with pytest.raises(ValueError, match="uint8"):
        predict_probs(model, image.astype(np.float32), protocol="whole", num_classes=3)


# ---- evaluator -------------------------------------------------------------------------------------

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def colour_model(classes: int) -> Pointwise:
    """Binary: class 1 where red dominates green (fg = red, bg = green). 3 classes: argmax of R, G, B."""
    eye = torch.eye(3)
    weight = 10 * (eye[[1, 0]] if classes == 2 else eye)
    return Pointwise(classes, weight)


def _paint(pred_mask: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    return np.asarray(palette, np.uint8)[pred_mask]


def _polyp_source(tmp_path) -> DataSource:
    """img1 20×30 (a), img2 24×18 (a), img3 16×16 (b); images painted so the model predicts ``pred``."""
    specs = []
    t1, p1 = np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)
    t1[0:10], p1[5:15] = 1, 1          # TP 5×30 = 150, FP 150, FN 150: Dice 0.5, IoU 1/3
    specs.append(("img1", "a", t1, p1))
    empty = np.zeros((24, 18), np.uint8)
    specs.append(("img2", "a", empty, empty))  # both empty: Dice = IoU = 1
    t3, p3 = np.ones((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    p3[:, :8] = 1                      # TP 128, FP 0, FN 128: Dice 256/384 = 2/3, IoU 1/2
    specs.append(("img3", "b", t3, p3))
    samples = []
    for stem, subset, truth, pred in specs:
        Image.fromarray(_paint(pred, [GREEN, RED])).save(tmp_path / f"{stem}.png")
        Image.fromarray(truth).save(tmp_path / f"{stem}_mask.png")
        samples.append(Sample(stem, tmp_path / f"{stem}.png", tmp_path / f"{stem}_mask.png", subset=subset))
    return DataSource("fake-polyp", tmp_path, ClassTable.binary("polyp"), samples,
                      decode_mask=lambda p: np.array(Image.open(p)))


def test_evaluate_source_per_subset_and_mean_of_subsets(tmp_path) -> None:
    source = _polyp_source(tmp_path)
    calls = []
    res = evaluate_source(colour_model(2), source, ["img1", "img2", "img3"], protocol="whole",
                          progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [r["stem"] for r in res.per_image] == ["img1", "img2", "img3"]
    np.testing.assert_allclose([r["dice"] for r in res.per_image], [0.5, 1.0, 2 / 3])
    np.testing.assert_allclose([r["iou"] for r in res.per_image], [1 / 3, 1.0, 0.5])
    assert res.dice == pytest.approx((0.5 + 1 + 2 / 3) / 3)                  # 13/18 over images
    # pooled: TP 150 + 128 = 278, FP 150, FN 150 + 128 = 278
    assert res.dice_pooled == pytest.approx(2 * 278 / (2 * 278 + 150 + 278))
    assert res.iou_pooled == pytest.approx(278 / (278 + 150 + 278))
    a, b = res.per_subset["a"], res.per_subset["b"]
    assert (a["dice"], a["iou"], a["n_images"]) == pytest.approx(((0.5 + 1) / 2, (1 / 3 + 1) / 2, 2))
    assert (b["dice"], b["iou"], b["n_images"]) == pytest.approx((2 / 3, 0.5, 1))
    assert res.mean_of_subsets["dice"] == pytest.approx((0.75 + 2 / 3) / 2)  # 17/24 != 13/18
    assert res.headline_metric == "dice" and res.headline() == pytest.approx(17 / 24)
    assert res.headline("dice_pooled") == pytest.approx(res.mean_of_subsets["dice_pooled"])
    # all 600 + 432 + 256 pixels scored; wrong ones are FP + FN = 300 + 0 + 128
    assert res.confusion.sum() == 1288
    assert res.pixel_accuracy == pytest.approx((1288 - 428) / 1288)
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    for key in ("miou", "per_class_iou", "pixel_accuracy", "dice", "iou", "dice_pooled", "iou_pooled",
                "per_subset", "mean_of_subsets", "n_images"):
        assert key in d
    assert d["n_images"] == 3 and d["protocol"] == "whole"
    assert set(d["per_class_iou"]) == {"background", "polyp"}


def test_evaluate_source_center_crop_scores_only_the_crop(tmp_path) -> None:
    source = _polyp_source(tmp_path)
    res = evaluate_source(colour_model(2), source, ["img3"], protocol="center_crop", size=8)
    # crop rows/cols 4..11: pred fg in cols 4..7 (TP 32), truth fg everywhere (FN 32): Dice 64/96
    assert res.confusion.sum() == 64
    assert res.dice == pytest.approx(2 / 3)
    res = evaluate_source(colour_model(2), source, ["img1", "img3"], protocol="resize", size=(16, 16))
    assert res.confusion.sum() == 600 + 256  # scored at original resolution


def test_evaluate_source_errors(tmp_path) -> None:
    source = _polyp_source(tmp_path)
    with pytest.raises(DataError, match="nope"):
        evaluate_source(colour_model(2), source, ["nope"], protocol="whole")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "img2_mask.png")
    with pytest.raises(DataError, match="img2"):
        evaluate_source(colour_model(2), source, ["img2"], protocol="whole")


def test_evaluate_arrays_matches_source_on_same_size(tmp_path) -> None:
    source = _polyp_source(tmp_path)
    from semiseg.data.decode import read_image

    images = np.stack([read_image(tmp_path / "img3.png")] * 2)
    masks = np.stack([np.array(Image.open(tmp_path / "img3_mask.png"))] * 2)
    arr = evaluate_arrays(colour_model(2), images, masks, classes=source.classes, batch_size=1,
                          stems=["x", "y"], subsets=["b", "b"])
    src = evaluate_source(colour_model(2), source, ["img3", "img3"], protocol="whole")
    a, b = arr.to_dict(), src.to_dict()
    for key in ("miou", "per_class_iou", "pixel_accuracy", "dice", "iou", "dice_pooled", "n_images"):
        assert a[key] == pytest.approx(b[key])
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert a["mean_of_subsets"]["dice"] == pytest.approx(b["mean_of_subsets"]["dice"]) == pytest.approx(2 / 3)


def test_evaluate_arrays_multiclass_hand_example() -> None:
    classes = ClassTable(("road", "car", "tree"))
    pred = np.zeros((2, 4, 4), np.int64)
    pred[0, 2:] = 1                        # image 1: rows 0-1 class 0, rows 2-3 class 1
    pred[1] = 2                            # image 2: all class 2
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, 2], truth[0, 3] = 1, 2        # image 1: rows 0-1 class 0, row 2 class 1, row 3 class 2
    truth[1, 0], truth[1, 1:] = 255, 2     # image 2: row 0 ignored, rows 1-3 class 2
    images = _paint(pred, [RED, GREEN, BLUE])
    res = evaluate_arrays(colour_model(3), images, truth, classes=classes, batch_size=16)
    # confusion (rows truth): [[8, 0, 0], [0, 4, 0], [0, 4, 12]]
    assert res.confusion.tolist() == [[8, 0, 0], [0, 4, 0], [0, 4, 12]]
    # IoU: 8/8, 4/(4 + 8 - 4), 12/(16 + 12 - 12) -> mIoU (1 + 0.5 + 0.75)/3; accuracy 24/28
    assert res.per_class_iou == pytest.approx({"road": 1.0, "car": 0.5, "tree": 0.75})
    assert res.miou == pytest.approx(0.75) and res.pixel_accuracy == pytest.approx(24 / 28)
    # per-image mIoU (nanmean): image 1 (1 + 0.5 + 0)/3; image 2 only "tree" present -> 1
    np.testing.assert_allclose([r["miou"] for r in res.per_image], [0.5, 1.0])
    assert res.dice is None and res.per_subset == {} and res.mean_of_subsets is None
    assert res.headline_metric == headline_metric(classes) == "miou" and res.headline() == pytest.approx(0.75)
    zero = evaluate_arrays(colour_model(3), images, truth, classes=classes, batch_size=1, absent="zero")
    np.testing.assert_allclose([r["miou"] for r in zero.per_image], [0.5, 1 / 3])
    assert isinstance(res, EvalResult) and res.to_dict()["dice"] is None
    assert not math.isnan(res.to_dict()["miou"])
