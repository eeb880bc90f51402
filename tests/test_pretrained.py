"""The offline ImageNet encoder and the input normalisation the model carries through a run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from semiseg.api import load_config
from semiseg.config import ModelConfig
from semiseg.data.normalization import (
    IMAGENET,
    OFFLINE_ENCODERS,
    SYMMETRIC,
    Normalization,
    default_normalization,
    pad_with_mean,
)
from semiseg.engine.trainer import warmup_factor
from semiseg.errors import ConfigError
from semiseg.models.factory import build_model
from semiseg.models.pretrained import EFFICIENTNET_LITE0, OFFLINE_WEIGHTS
from tests.cli_helpers import semiseg, train_args


def _model(weights: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(weights=weights), 2).eval()


def test_the_package_weight_file_is_the_pinned_one() -> None:
    path = EFFICIENTNET_LITE0.weights_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_every_encoder_tensor_comes_from_the_package() -> None:
    source = list(torch.load(EFFICIENTNET_LITE0.weights_file(), map_location="cpu", weights_only=True).values())
    pretrained = _model("imagenet").encoder.model.state_dict()
    scratch = _model("none").encoder.model.state_dict()  # same seed: what an unloaded tensor would hold
    # the encoder (timm features_only) is the package's first tensors in order, minus the classifier head
    for i, (key, tensor) in enumerate(pretrained.items()):
        assert torch.equal(tensor, source[i]), key
        if tensor.is_floating_point():
            assert not torch.equal(tensor, scratch[key]), f"{key} kept its initial value"
    assert len(pretrained) == len(source) - 8  # conv_head (1) + bn2 (5 incl. num_batches_tracked) + fc (2)


def test_encoder_output_on_a_fixed_input_is_pinned() -> None:
    model = _model("imagenet")
    h, w = 64, 96
    x = torch.linspace(0, 1, 3 * h * w).reshape(1, 3, h, w)
    with torch.no_grad():
        deepest = model.encoder(model.input_normalization(model, (x,))[0])[-1]
    assert deepest.shape == (1, 320, 2, 3)
    # computed once from the package's weights (commit that introduced them)
    assert deepest.mean().item() == pytest.approx(0.0253847, abs=1e-4)
    assert deepest.std().item() == pytest.approx(1.5823698, rel=1e-4)
    np.testing.assert_allclose(deepest.flatten()[:3].numpy(), [0.1356519, 0.9386088, 0.1967687], atol=1e-4)


def test_model_applies_its_normalisation_before_the_network() -> None:
    norm = Normalization(mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.1))
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet18", weights="none", decoder_channels=[8, 8, 8, 8, 8],
                                    normalization=norm), 2).eval()
    x = torch.rand(2, 3, 32, 32)
    by_hand = (x - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.1]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward(by_hand))  # forward() skips the hook: the hook did exactly this
    padded = pad_with_mean(model, x, (0, 2, 0, 1))
    assert padded.shape == (2, 3, 33, 34) and torch.equal(padded[..., :32, :32], x)
    assert torch.equal(padded[0, :, 32, 33], torch.tensor([0.2, 0.4, 0.6]))  # zero once normalised


def test_the_config_and_the_models_agree_on_the_offline_encoders() -> None:
    # the names live below the config (data.normalization), the weight files with the models: one list each
    assert tuple(OFFLINE_WEIGHTS) == OFFLINE_ENCODERS
    for offline in OFFLINE_WEIGHTS.values():  # by our name or by the smp encoder it builds: the same statistics
        assert default_normalization(offline.smp_encoder) == default_normalization(offline.name)
    assert default_normalization("efficientnet-lite0") == SYMMETRIC


def test_normalisation_is_resolved_once_per_encoder() -> None:
    assert ModelConfig().resolved().normalization == SYMMETRIC  # Lite0: TF inputs on [-1, 1]
    assert ModelConfig(encoder="resnet18", weights="none").resolved().normalization == IMAGENET
    explicit = Normalization(mean=(0.1, 0.1, 0.1), std=(0.3, 0.3, 0.3))
    assert ModelConfig(normalization=explicit).resolved().normalization == explicit
    # a run's config from before the option existed (no key) reads back with what it trained with
    assert load_config(None, ["model.encoder=resnet18", "model.weights=none"]).model.normalization == IMAGENET


def test_warmup_factor_hand_values() -> None:
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_imagenet_for_an_encoder_without_offline_weights_fails_at_once(tmp_path) -> None:
    with pytest.raises(ConfigError, match="offline weights exist for: efficientnet-lite0"):
        load_config(None, ["model.encoder=resnet18"])
    out = tmp_path / "runs"
    proc = semiseg(train_args("r18", out, ["model.encoder=resnet18"]), tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.weights=imagenet" in proc.stderr and "efficientnet-lite0" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_normalisation_round_trips_through_a_run(tmp_path) -> None:
    """Train (pretrained Lite0 by default), then evaluate and predict in new processes: the same numbers as the
    training process, because the model rebuilt from config.yaml carries the statistics it trained with."""
    from semiseg import api
    from semiseg.evaluation.inference import predict_probs

    semiseg(train_args("run", tmp_path / "runs"), tmp_path)
    run = tmp_path / "runs" / "run"
    recorded = yaml.safe_load((run / "config.yaml").read_text())["model"]["normalization"]
    assert recorded == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    trained = json.loads((run / "results.json").read_text())["test"]
    semiseg(["evaluate", str(run), "--split", "test", "--json", str(tmp_path / "eval.json")], tmp_path)
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert {k: evaluated[k] for k in trained} == trained  # every test figure, bit for bit

    ctx, model = api.load_run(run)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    arrays = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(2)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(images / f"{i}.png")
    semiseg(["predict", str(run), str(images), str(tmp_path / "pred")], tmp_path)
    size = tuple(ctx.config.data.size)
    for i, a in enumerate(arrays):
        here = predict_probs(model, a, protocol="resize", size=size, num_classes=2).probs.argmax(0).numpy()
        there = np.asarray(Image.open(tmp_path / "pred" / "masks" / f"{i}.png"))
        assert np.array_equal(here, there)
