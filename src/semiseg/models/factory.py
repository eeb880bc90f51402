"""Model factory over segmentation-models-pytorch, and the encoder / decoder / classifier parameter groups."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn

from semiseg.config import ModelConfig, check_weights
from semiseg.data.normalization import attach_input_normalization
from semiseg.errors import ConfigError
from semiseg.models.pretrained import load_imagenet_encoder, smp_encoder_name

ParamGroup = Literal["encoder", "decoder", "classifier"]


def build_model(config: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build an smp model with ``num_classes`` output channels on the CPU (callers move it); its input
    normalisation (``config.normalization``) is attached as a forward pre-hook, so it takes ``[0, 1]`` images."""
    import segmentation_models_pytorch as smp

    check_weights(config)
    kwargs = dict(config.options)
    if config.decoder_channels is not None:
        kwargs["decoder_channels"] = tuple(config.decoder_channels)
    try:
        model = smp.create_model(
            config.arch, encoder_name=smp_encoder_name(config.encoder), encoder_weights=None,
            in_channels=in_channels, classes=num_classes, **kwargs,
        )
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"model: cannot build arch={config.arch!r} encoder={config.encoder!r}: {err}") from err
    if config.weights == "imagenet":
        load_imagenet_encoder(model, config.encoder)
    elif config.weights != "none":
        load_weights(model, Path(config.weights))
    return attach_input_normalization(model, config.input_normalization())


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a full-model or encoder-only state dict (keys with or without an ``encoder.`` prefix), or a
    semiseg checkpoint; a partial or mismatched load is an error naming the keys (``models.weights``)."""
    from semiseg.models.weights import load_weight_file

    load_weight_file(model, path)


def param_group_of(name: str) -> ParamGroup:
    """Group of a parameter by its name in an smp model: encoder, classifier (segmentation head), decoder."""
    if name.startswith("encoder."):
        return "encoder"
    if name.startswith(("segmentation_head.", "classification_head.")):
        return "classifier"
    return "decoder"


def parameter_groups(model: nn.Module) -> dict[ParamGroup, list[nn.Parameter]]:
    """Parameters split into encoder / decoder / classifier (for a head LR multiplier and partial EMA)."""
    groups: dict[ParamGroup, list[nn.Parameter]] = {"encoder": [], "decoder": [], "classifier": []}
    for name, param in unwrap(model).named_parameters():
        groups[param_group_of(name)].append(param)
    return groups


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
