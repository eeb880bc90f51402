"""Losses against hand computations on tiny tensors (the arithmetic is written out in each test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semiseg.losses import (
    confidence_weighted_cross_entropy,
    cross_entropy,
    dice_loss,
    dynamic_cross_entropy,
    tversky_loss,
)
from semiseg.pseudo.policies import percentile_linear

LN43 = math.log(4 / 3)  # CE of a pixel with softmax 3/4 on its target
LN4 = math.log(4)  # CE of a pixel with softmax 1/4 on its target


def binary_logits(p_fg: list[list[list[float]]]) -> torch.Tensor:
    """B×2×H×W logits [0, logit(p)]: softmax foreground == p (as sigmoid(z) == softmax([0, z])[1])."""
    p = torch.tensor(p_fg, dtype=torch.float64)
    z = torch.log(p / (1 - p))
    return torch.stack([torch.zeros_like(z), z], dim=1).float().requires_grad_(True)


def quarter_logits(shape: tuple[int, int, int]) -> torch.Tensor:
    """Logits [0, ln 3] everywhere: softmax = [1/4, 3/4] (CE = ln 4 for class 0, ln 4/3 for class 1)."""
    b, h, w = shape
    x = torch.zeros(b, 2, h, w)
    x[:, 1] = math.log(3)
    return x.requires_grad_(True)


# ------------------------------------------------------------------------------------------------ CE
def test_cross_entropy_hand_and_all_ignored() -> None:
    logits = quarter_logits((1, 1, 3))
    target = torch.tensor([[[1, 0, 255]]])
    # (ln 4/3 + ln 4) / 2 non-ignored pixels
    assert cross_entropy(logits, target).item() == pytest.approx((LN43 + LN4) / 2, rel=1e-6)
    assert cross_entropy(logits, target.to(torch.uint8)).item() == pytest.approx((LN43 + LN4) / 2, rel=1e-6)

    loss = cross_entropy(logits, torch.full((1, 1, 3), 255))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


# ---------------------------------------------------------------------------------------- Dice/Tversky
P = [[[0.8, 0.4]], [[0.5, 0.1]]]  # two images of 1×2 pixels, foreground probabilities
T = torch.tensor([[[1, 0]], [[1, 255]]])  # the 0.1 pixel is ignored


def test_dice_batch_global_hand() -> None:
    # TP = 0.8 + 0.5 = 1.3; ΣP = 0.8 + 0.4 + 0.5 = 1.7 (ignored 0.1 dropped); ΣT = 2
    # Dice = 2·1.3 / (1.7 + 2) = 2.6 / 3.7
    loss = dice_loss(binary_logits(P), T)
    assert loss.item() == pytest.approx(1 - 2.6 / 3.7, rel=1e-6)


def test_dice_per_image_hand() -> None:
    # image 1: TP 0.8, ΣP 1.2, ΣT 1 -> 1.6/2.2; image 2: TP 0.5, ΣP 0.5, ΣT 1 -> 1.0/1.5
    loss = dice_loss(binary_logits(P), T, reduction="image")
    assert loss.item() == pytest.approx(((1 - 1.6 / 2.2) + (1 - 1.0 / 1.5)) / 2, rel=1e-6)


def test_dice_empty_target_smp_rule() -> None:
    logits = binary_logits([[[0.3, 0.6]]])
    empty = torch.zeros(1, 1, 2, dtype=torch.long)
    assert dice_loss(logits, empty).item() == 0.0  # smp: no foreground in the batch -> 0
    # without the rule: Dice = 0 / 0.9 -> loss 1
    assert dice_loss(logits, empty, skip_empty=False).item() == pytest.approx(1.0)


def test_dice_soft_target_hand() -> None:
    logits = binary_logits([[[0.8, 0.4]]])
    soft = torch.tensor([[[0.6, 0.2]]])
    # product: TP = 0.48 + 0.08 = 0.56; ΣP = 1.2, ΣT = 0.8 -> Dice = 1.12 / 2.0
    assert dice_loss(logits, None, soft_target=soft).item() == pytest.approx(1 - 1.12 / 2.0, rel=1e-6)
    # min: TP = 0.6 + 0.2 = 0.8 -> Dice = 1.6 / 2.0
    got = dice_loss(logits, None, soft_target=soft, intersection="min")
    assert got.item() == pytest.approx(1 - 1.6 / 2.0, rel=1e-6)
    # a 255 in target still ignores that pixel: TP = 0.48, ΣP = 0.8, ΣT = 0.6 -> 0.96 / 1.4
    got = dice_loss(logits, torch.tensor([[[1, 255]]]), soft_target=soft)
    assert got.item() == pytest.approx(1 - 0.96 / 1.4, rel=1e-6)
    # C×H×W soft targets give the same as the foreground map
    both = torch.stack([1 - soft, soft], dim=1)
    assert dice_loss(logits, None, soft_target=both).item() == pytest.approx(1 - 1.12 / 2.0, rel=1e-6)


def test_dice_matches_smp_binary_and_multiclass() -> None:
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 5, 6, generator=g)
    target = (torch.rand(3, 5, 6, generator=g) > 0.6).long()
    target[0, 0, :3] = 255
    ref = smp_losses.DiceLoss("binary", from_logits=True, ignore_index=255)(z, target.unsqueeze(1))
    ours = dice_loss(torch.cat([torch.zeros_like(z), z], dim=1), target)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)

    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[target == 3] = 0  # class 3 absent from the target: smp counts it as 0 in the class mean
    target[1, 2, :] = 255
    ref = smp_losses.DiceLoss("multiclass", from_logits=True, ignore_index=255)(logits, target)
    assert dice_loss(logits, target).item() == pytest.approx(ref.item(), abs=1e-6)


def test_tversky_hand_and_dice_identity() -> None:
    # TP = 1.3, FP = ΣP - TP = 0.4, FN = ΣT - TP = 0.7; alpha 0.3 (FP), beta 0.7 (FN)
    # T = 1.3 / (1.3 + 0.3·0.4 + 0.7·0.7) = 1.3 / 1.91
    loss = tversky_loss(binary_logits(P), T, alpha=0.3, beta=0.7)
    assert loss.item() == pytest.approx(1 - 1.3 / 1.91, rel=1e-6)

    g = torch.Generator().manual_seed(1)
    for c in (2, 3):
        logits = torch.randn(2, c, 4, 5, generator=g)
        target = torch.randint(0, c, (2, 4, 5), generator=g)
        target[0, 0] = 255
        for reduction in ("batch", "image"):
            d = dice_loss(logits, target, reduction=reduction)
            t = tversky_loss(logits, target, alpha=0.5, beta=0.5, reduction=reduction)
            assert t.item() == pytest.approx(d.item(), abs=1e-6)
    soft = torch.rand(2, 4, 5, generator=g)
    logits = torch.randn(2, 2, 4, 5, generator=g)
    assert tversky_loss(logits, None, soft_target=soft).item() == pytest.approx(
        dice_loss(logits, None, soft_target=soft).item(), abs=1e-6)


def test_dice_gradient_flows() -> None:
    logits = binary_logits(P)
    dice_loss(logits, T).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- dynamic
def test_dynamic_gamma_zero_is_ce() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 5, 5, generator=g)
    target = torch.randint(0, 3, (4, 5, 5), generator=g)
    target[1, :2] = 255
    ce = cross_entropy(logits, target).item()
    for gamma, pseudo_count in ((0, 2), (9, 0)):
        got = dynamic_cross_entropy(logits, target, gamma=gamma, pseudo_count=pseudo_count)
        assert got.item() == pytest.approx(ce, rel=1e-6)


def test_dynamic_gamma9_two_pixels() -> None:
    # batch [pseudo; labeled], each 1×2 with the second pixel ignored.
    # pseudo pixel: target 1, p = 3/4 -> weight (3/4)^9, CE ln 4/3; labeled pixel: target 0, CE ln 4, weight 1
    # loss = ((3/4)^9·ln 4/3 + ln 4) / 2 non-ignored pixels (not / sum of weights)
    logits = quarter_logits((2, 1, 2))
    target = torch.tensor([[[1, 255]], [[0, 255]]])
    loss = dynamic_cross_entropy(logits, target, gamma=9, pseudo_count=1)
    w = 0.75**9
    assert loss.item() == pytest.approx((w * LN43 + LN4) / 2, rel=1e-6)
    # the weight is detached: d loss / d logits of the pseudo pixel = w/2 · (softmax - onehot)
    loss.backward()
    expected = torch.tensor([0.25, 0.75 - 1.0]) * w / 2
    assert torch.allclose(logits.grad[0, :, 0, 0], expected, atol=1e-7)
    assert torch.allclose(logits.grad[1, :, 0, 0], torch.tensor([0.25 - 1.0, 0.75]) / 2, atol=1e-7)
    assert torch.all(logits.grad[:, :, 0, 1] == 0)


def test_dynamic_all_ignored_is_zero() -> None:
    logits = quarter_logits((2, 1, 2))
    loss = dynamic_cross_entropy(logits, torch.full((2, 1, 2), 255), gamma=9, pseudo_count=1)
    assert loss.item() == 0.0
    loss.backward()


# ----------------------------------------------------------------------------------------------- GTA
CONF = [0.9, 0.6, 0.7, 0.8, 0.55, 0.95]
TARGET = torch.tensor([[[1, 0, 1, 1, 0, 255]]])


def teacher_with_conf(conf: list[float]) -> torch.Tensor:
    return binary_logits([[conf]]).detach()


def test_percentile_matches_numpy() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1000, generator=g)
    for q in (0.0, 12.5, 20.0, 50.0, 80.0, 99.9, 100.0):
        assert percentile_linear(x, q).item() == pytest.approx(float(np.percentile(x.numpy(), q)), abs=1e-7)
    # valid confidences 0.9 0.6 0.7 0.8 0.55 sorted: .55 .6 .7 .8 .9; 20th pct: pos 0.8 -> .55 + .8·.05 = .59
    assert percentile_linear(torch.tensor(CONF[:5]), 20.0).item() == pytest.approx(0.59, abs=1e-6)


def test_gta_drop_and_weighting_hand() -> None:
    # threshold 0.59 drops the 0.55 pixel (target -> 255, c -> 0). Student softmax [1/4, 3/4] everywhere:
    # numerator = 1.9·ln4/3 (t=1) + 1.6·ln4 (t=0) + 1.7·ln4/3 + 1.8·ln4/3 = 5.4·ln4/3 + 1.6·ln4
    # denominator = Σ over all 6 pixels (c + 1) = 1.9 + 1.6 + 1.7 + 1.8 + 1 (dropped) + 1.95 (already 255)
    logits = quarter_logits((1, 1, 6))
    teacher = teacher_with_conf(CONF)
    target = TARGET.clone()
    loss = confidence_weighted_cross_entropy(logits, target, teacher)
    num = 5.4 * LN43 + 1.6 * LN4
    assert loss.item() == pytest.approx(num / 9.95, rel=1e-5)
    assert torch.equal(target, TARGET)  # unlike the released code, the caller's target is not modified
    # the already-ignored pixel counted like a dropped one: denominator 9.0
    got = confidence_weighted_cross_entropy(logits, TARGET, teacher, ignored_count_as_dropped=True)
    assert got.item() == pytest.approx(num / 9.0, rel=1e-5)
    # paper Eq. 6-7 with τ = 1: weighted mean over kept pixels, denominator 1.9 + 1.6 + 1.7 + 1.8 = 7
    assert confidence_weighted_cross_entropy(logits, TARGET, teacher, tau=1.0).item() == pytest.approx(
        num / 7.0, rel=1e-5)
    # τ = 0.5: (1.4·ln4/3 + 1.1·ln4 + 1.2·ln4/3 + 1.3·ln4/3) / 5.0
    assert confidence_weighted_cross_entropy(logits, TARGET, teacher, tau=0.5).item() == pytest.approx(
        (3.9 * LN43 + 1.1 * LN4) / 5.0, rel=1e-5)
    # drop 40 %: pos 1.6 -> .6 + .6·.1 = .66 drops .55 and .6: num 5.4·ln4/3, den 1.9+1+1.7+1.8+1+1.95 = 9.35
    got = confidence_weighted_cross_entropy(logits, TARGET, teacher, drop_percent=40.0)
    assert got.item() == pytest.approx(5.4 * LN43 / 9.35, rel=1e-5)


def _released_formula(pred: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor, drop: float) -> float:
    """The released code's expression, spelt out with numpy percentile and its two normalisations."""
    b, _, h, w = pred.shape
    target = target.clone()
    conf = teacher.softmax(1).max(1).values
    thresh = np.percentile(conf[target != 255].numpy(), drop)
    mask = (conf <= thresh) & (target != 255)
    conf[mask] = 0
    target[mask] = 255
    n_valid = (target != 255).sum()
    ce = torch.nn.functional.cross_entropy(pred, target, ignore_index=255, reduction="none")
    weight = (conf + 1) / (conf + 1).sum() * n_valid
    return float(torch.mean(weight * (b * h * w / n_valid) * ce))


def test_gta_matches_released_formula_random() -> None:
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(3, 4, 8, 8, generator=g)
    teacher = torch.randn(3, 4, 8, 8, generator=g) * 2
    target = teacher.argmax(1)
    target[0, :2] = 255
    ours = confidence_weighted_cross_entropy(pred, target, teacher).item()
    assert ours == pytest.approx(_released_formula(pred, target, teacher, 20.0), rel=1e-5)


def test_gta_gradient_only_to_student() -> None:
    logits = quarter_logits((1, 1, 6))
    teacher = teacher_with_conf(CONF).requires_grad_(True)
    confidence_weighted_cross_entropy(logits, TARGET, teacher).backward()
    assert logits.grad is not None and teacher.grad is None
    zero = confidence_weighted_cross_entropy(logits, torch.full((1, 1, 6), 255), teacher)
    assert zero.item() == 0.0
