"""``model.weights: <file.pt>``: load a full-model or encoder state dict, or a semiseg checkpoint, exactly.

Every key must find its place with the right shape: a file made for another encoder, or one that would
leave part of the network at random initialisation, is an error that names the keys, never a silent
partial load. The files are read with ``weights_only=True`` (a file carrying code is refused).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semiseg.errors import ConfigError
from semiseg.layout import STAGES, StageLayout

# classification heads of ImageNet checkpoints (torchvision, timm, efficientnet): not part of an smp encoder
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.", "_fc.")


def _show(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# how files that are not PyTorch weights begin (for a message that says what the file is instead)
_OTHER_FORMATS = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
                  b"%PDF": "a PDF document", b"\x1f\x8b": "gzip-compressed", b"\x89HDF": "an HDF5 (Keras) file"}


def not_torch_file(path: Path) -> str | None:
    """What ``path`` is when it cannot be a file ``torch.save`` wrote (a zip archive, or a pickle in the legacy
    format), else None: a JPEG given as weights is named as one, not as a pickle that could run code."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if not head:
        return "is empty"
    kind = next((what for magic, what in _OTHER_FORMATS.items() if head.startswith(magic)), None)
    if kind is None:
        kind = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "of another format"
    return f"is {kind}, not a PyTorch file"


def _read(path: Path) -> Any:
    if path.is_dir():
        raise ConfigError(f"model.weights: {path} is a folder; give a weight file (of a semiseg run: "
                          f"{StageLayout(path / STAGES / '<i>-<stage>').best()})")
    if not path.is_file():
        raise ConfigError(f"model.weights: file not found: {path}")
    other = not_torch_file(path)
    if other:
        raise ConfigError(f"model.weights: {path} is not a readable PyTorch state dict (the file {other}); give "
                          "a .pt/.pth file saved with torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"model.weights: {path} refused: it holds Python objects besides tensors (it could run "
                          f"code when loaded); save a plain state dict ({str(err).splitlines()[0][:120]})") from None
    except Exception as err:  # noqa: BLE001 - any other failure is a bad file for the user
        raise ConfigError(f"model.weights: {path} is not a readable PyTorch state dict "
                          f"({type(err).__name__}: {str(err)[:160]})") from None


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: a state dict, ``{"state_dict": ...}``, or a semiseg checkpoint
    (``best.pt``: ``{"net": ...}``; ``last.pt``: ``{"nets": {name: ...}}`` with a single network)."""
    if isinstance(obj, dict) and isinstance(obj.get("net"), dict):
        obj = obj["net"]
    elif isinstance(obj, dict) and isinstance(obj.get("nets"), dict):
        nets = obj["nets"]
        if len(nets) != 1:
            raise ConfigError(f"model.weights: {path} is a training checkpoint of networks {', '.join(nets)}; "
                              f"use the stage's {StageLayout(Path()).best()} (the model selected on "
                              "validation)")
        obj = next(iter(nets.values()))
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = f"keys {_show([str(k) for k in obj])}" if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"model.weights: {path} is not a state dict of tensors ({kind})")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel / DDP saves


def load_weight_file(model: nn.Module, path: Path, encoder_name: str = "") -> None:
    """Load ``path`` into ``model`` (full model) or into ``model.encoder`` (keys with or without the
    ``encoder.`` prefix); every model key must be covered and every file key used, with equal shapes
    (ImageNet classifier heads of an encoder file excepted)."""
    state = state_dict_of(_read(path), path)
    own = model.state_dict()
    if any(k in own and not k.startswith("encoder.") for k in state):
        target, module, what = own, model, "the model"
    else:
        state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
        module = model.encoder  # type: ignore[attr-defined]
        target, what = module.state_dict(), f"the {encoder_name or 'model'} encoder"
    if not any(k in target for k in state):
        raise ConfigError(f"model.weights: no key of {path} matches the model or its encoder (file: "
                          f"{_show(sorted(state))}; model: {_show(sorted(own))})")
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
              if k in target and v.shape != target[k].shape]
    if shapes:
        raise ConfigError(f"model.weights: {path} does not fit {what}: {len(shapes)} tensor(s) of another shape "
                          f"(file vs model: {_show(shapes)}); weights of another encoder or class count?")
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unused = [k for k in state if k not in target]
    if missing or unused:
        parts = ([f"{len(missing)} of {len(target)} keys of {what} are not in the file ({_show(missing)})"]
                 if missing else []) + ([f"{len(unused)} keys of the file are unused ({_show(unused)})"]
                                       if unused else [])
        raise ConfigError(f"model.weights: {path} would load only partly: {'; '.join(parts)}")
    module.load_state_dict(state, strict=False)  # strict apart from num_batches_tracked counters
