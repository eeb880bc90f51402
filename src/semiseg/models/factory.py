"""Model factory over segmentation-models-pytorch, and the encoder / decoder / classifier parameter groups."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from semiseg.data.normalization import Normalization, attach_input_normalization
from semiseg.errors import ConfigError
from semiseg.models.pretrained import OFFLINE_ENCODERS, default_normalization, load_imagenet_encoder, smp_encoder_name

ParamGroup = Literal["encoder", "decoder", "classifier"]


class ModelConfig(BaseModel):
    """Which network to build: by default the ImageNet-pretrained EfficientNet-Lite0 Unet (weights installed
    with semiseg, no download). Any smp architecture and encoder; weights are offline-only."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("Unet", description="smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, PSPNet, ...")
    encoder: str = Field("efficientnet-lite0", description=(
        f"efficientnet-lite0 (offline ImageNet weights) or any smp encoder name (resnet18, resnet50, "
        f"densenet169, tu-<timm name>, ...); offline weights: {', '.join(OFFLINE_ENCODERS)}"))
    weights: str = Field("imagenet", description=(
        "imagenet (offline, for " + ", ".join(OFFLINE_ENCODERS) + ") | none (from scratch) | path to a .pt "
        "state dict"))
    decoder_channels: list[int] | None = Field(
        [128, 64, 32, 16, 8], description="Unet-family decoder widths (null: smp's default)")
    normalization: Literal["auto"] | Normalization = Field("auto", description=(
        "input mean/std on [0, 1]; auto: the encoder's pretraining statistics (efficientnet-lite0: 0.5/0.5, "
        "smp's ImageNet encoders: torchvision's), resolved once and recorded in the run's config.yaml"))
    options: dict = Field(default_factory=dict, description="further keyword arguments for the smp model")

    def resolved(self) -> ModelConfig:
        """This config with ``normalization`` decided (what a run records and every later use reads)."""
        if self.normalization != "auto":
            return self
        return self.model_copy(update={"normalization": default_normalization(self.encoder)})

    def input_normalization(self) -> Normalization:
        norm = self.resolved().normalization
        assert isinstance(norm, Normalization)
        return norm


def check_weights(config: ModelConfig) -> None:
    """Fail at once (before anything is built or written) for ``imagenet`` without offline weights."""
    if config.weights == "imagenet" and config.encoder not in OFFLINE_ENCODERS:
        names = ", ".join(sorted(OFFLINE_ENCODERS))
        raise ConfigError(
            f"model.weights=imagenet: no offline ImageNet weights for encoder {config.encoder!r} (semiseg never "
            f"downloads at run time); offline weights exist for: {names}. Use model.encoder={names.split(',')[0]}, "
            "pass model.weights=<path/to/encoder_state_dict.pt>, or train from scratch with model.weights=none.")


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
