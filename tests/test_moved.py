"""A delivered network that barely left its initialisation is flagged in the results."""

from types import SimpleNamespace

import pytest
import torch

from semiseg.api import load_config
from semiseg.pipeline.training import MOVED_WARNING, barely_moved_warning, moved_from_init, new_model


def _ctx() -> SimpleNamespace:
    cfg = load_config(None, ["model.encoder=resnet18", "model.weights=none", "model.decoder_channels=[8,8,8,8,8]"])
    return SimpleNamespace(config=cfg, classes=SimpleNamespace(num_classes=2), init_seed=123)


def test_distance_from_the_shared_initialisation_by_hand() -> None:
    ctx = _ctx()
    model = new_model(ctx)
    moved = moved_from_init(ctx, model)
    assert moved == {"encoder": 0.0, "decoder": 0.0, "classifier": 0.0}
    assert "barely moved" in barely_moved_warning(moved)
    with torch.no_grad():  # scale every decoder parameter by 1.1: relative change exactly 0.1
        for name, p in model.named_parameters():
            if name.startswith("decoder."):
                p.mul_(1.1)
    moved = moved_from_init(ctx, model)
    assert moved["decoder"] == pytest.approx(0.1, rel=1e-4) and moved["encoder"] == 0.0
    assert 0.1 > MOVED_WARNING and barely_moved_warning(moved) is None
