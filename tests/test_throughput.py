"""`semiseg bench throughput`: the engine and the bare loop do the same work and report comparable figures."""

from __future__ import annotations

import pytest
import torch

from semiseg.bench.throughput import measure, measure_inference

pytestmark = pytest.mark.slow


def test_training_and_inference_figures_on_the_cpu() -> None:
    train = measure(steps=2, batch=2, size=32, repeats=1, device=torch.device("cpu"))
    assert train["device"] == "cpu" and train["engine_img_per_s"] > 0 and train["bare_img_per_s"] > 0
    assert train["ratio"] == pytest.approx(train["engine_img_per_s"] / train["bare_img_per_s"])
    infer = measure_inference(images=4, batch=2, size=32, frame=(48, 64), repeats=1)
    assert infer["engine_img_per_s"] > 0 and infer["bare_img_per_s"] > 0 and infer["images"] == 4
