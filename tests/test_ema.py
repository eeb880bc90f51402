"""EMA: warm-up formula, scopes touch exactly their parameters, buffers only when asked."""

import pytest
import torch

from semiseg.config import ModelConfig
from semiseg.models.ema import EMA, frozen_copy
from semiseg.models.factory import build_model, param_group_of


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    src = build_model(ModelConfig(encoder="resnet18", weights="none", decoder_channels=[16, 16, 16, 16, 16]), 2)
    return src


def perturbed(model):
    twin = frozen_copy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
        for b in twin.buffers():
            if b.dtype.is_floating_point:
                b.add_(1.0)
    return twin


def test_warmup_decay_formula(pair):
    ema = EMA(pair, pair, momentum=0.99, warmup=True)
    assert ema.decay(0) == 0.0  # 1 - 1/1
    assert ema.decay(1) == 0.5
    assert ema.decay(9) == pytest.approx(0.9)
    assert ema.decay(10_000) == 0.99
    assert EMA(pair, pair, momentum=0.95).decay(0) == 0.95


@pytest.mark.parametrize("scope,groups", [("all", {"encoder", "decoder", "classifier"}),
                                          ("encoder", {"encoder"}),
                                          ("all_but_classifier", {"encoder", "decoder"})])
def test_scope_touches_exactly_its_parameters(pair, scope, groups):
    target = perturbed(pair)
    before = {n: p.clone() for n, p in target.named_parameters()}
    buffers_before = {n: b.clone() for n, b in target.named_buffers()}
    EMA(pair, target, momentum=0.5, scope=scope).update()
    src = dict(pair.named_parameters())
    for name, p in target.named_parameters():
        if param_group_of(name) in groups:
            # 0.5 * (s + 1) + 0.5 * s = s + 0.5
            torch.testing.assert_close(p, src[name] + 0.5)
        else:
            assert torch.equal(p, before[name]), name
    for name, b in target.named_buffers():  # buffers untouched by default
        assert torch.equal(b, buffers_before[name]), name


def test_buffers_averaged_when_asked(pair):
    target = perturbed(pair)
    EMA(pair, target, momentum=0.5, buffers=True).update()
    src = dict(pair.named_buffers())
    for name, b in target.named_buffers():
        if b.dtype.is_floating_point:
            torch.testing.assert_close(b, src[name] + 0.5)
        else:
            assert torch.equal(b, src[name])


def test_frozen_copy_has_no_grad(pair):
    assert not any(p.requires_grad for p in frozen_copy(pair).parameters())
