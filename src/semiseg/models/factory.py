"""Model factory over segmentation-models-pytorch, and the encoder / decoder / classifier parameter groups."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from semiseg.errors import ConfigError

ParamGroup = Literal["encoder", "decoder", "classifier"]


class ModelConfig(BaseModel):
    """Which network to build. Any smp architecture and encoder; weights are offline-only."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("Unet", description="smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, PSPNet, ...")
    encoder: str = Field("resnet18", description="smp encoder name, e.g. resnet18, resnet50, densenet169")
    weights: str = Field(
        "none", description="none | imagenet (needs the smp weight download) | path to a .pt state dict"
    )
    decoder_channels: list[int] | None = Field(None, description="Unet-family decoder widths (smp default if null)")
    options: dict = Field(default_factory=dict, description="further keyword arguments for the smp model")


def build_model(config: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build an smp model with ``num_classes`` output channels, on the CPU (callers move it)."""
    import segmentation_models_pytorch as smp

    kwargs = dict(config.options)
    if config.decoder_channels is not None:
        kwargs["decoder_channels"] = tuple(config.decoder_channels)
    encoder_weights = "imagenet" if config.weights == "imagenet" else None
    try:
        model = smp.create_model(
            config.arch, encoder_name=config.encoder, encoder_weights=encoder_weights,
            in_channels=in_channels, classes=num_classes, **kwargs,
        )
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"model: cannot build arch={config.arch!r} encoder={config.encoder!r}: {err}") from err
    except (OSError, RuntimeError) as err:  # the weight download failed (offline machine)
        raise ConfigError(
            f"model.weights=imagenet: the pretrained weights of encoder {config.encoder!r} could not be "
            f"downloaded ({type(err).__name__}: {err}). This machine is offline: download the encoder "
            "state dict where there is network access and pass model.weights=<path/to/weights.pt>, "
            "or train from scratch with model.weights=none."
        ) from err
    if config.weights not in ("none", "imagenet"):
        load_weights(model, Path(config.weights))
    return model


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
