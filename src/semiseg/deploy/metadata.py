"""The ``semiseg`` metadata of an exported model, checked like a config before anything is predicted.

An ONNX file comes from outside (a copy, a download, an edit): its metadata is read as untrusted input. Every
value the deploy path uses is checked for type and range, so a crafted or damaged file ends in one line naming the
file and the key, not in a TypeError or an OpenCV assertion halfway through a folder. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from semiseg.errors import ConfigError

PROTOCOLS = ("resize", "whole", "sliding_window", "center_crop")
PAD_MODES = ("reflect", "zero")
MAX_SIDE = 8192  # pixels per side of a working size or window: far beyond any trained model, far below OOM


def _fail(where: Path, key: str, expected: str, value: Any) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return ConfigError(f"{where}: semiseg metadata {key}: expected {expected}, got {shown}; export the model again "
                       "with `semiseg export RUN_DIR`")


def _get(where: Path, meta: dict[str, Any], key: str) -> Any:
    value: Any = meta
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"{where}: semiseg metadata has no {key}; export the model again with "
                              "`semiseg export RUN_DIR`")
        value = value[part]
    return value


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _pair(where: Path, meta: dict[str, Any], key: str, *, optional: bool = False) -> tuple[int, int] | None:
    value = _get(where, meta, key)
    if value is None and optional:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v, 1, MAX_SIDE) for v in value)):
        raise _fail(where, key, f"[height, width] of whole numbers 1..{MAX_SIDE}" + (" or null" if optional else ""),
                    value)
    return value[0], value[1]


def parse_metadata(text: str | None, where: Path) -> dict[str, Any]:
    """The metadata JSON ``text`` of the model ``where``, checked; a ConfigError naming the key otherwise."""
    if text is None:
        raise ConfigError(f"{where}: no semiseg metadata (export it with `semiseg export RUN_DIR`)")
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{where}: semiseg metadata is not valid JSON ({err}); export the model again with "
                          "`semiseg export RUN_DIR`") from None
    if not isinstance(meta, dict):
        raise _fail(where, "(top level)", "a JSON object", meta)
    protocol = _get(where, meta, "preprocessing.protocol")
    if protocol not in PROTOCOLS:
        raise _fail(where, "preprocessing.protocol", " | ".join(PROTOCOLS), protocol)
    _pair(where, meta, "preprocessing.size")
    _pair(where, meta, "preprocessing.window", optional=True)
    _pair(where, meta, "preprocessing.stride", optional=True)
    if not _is_int(_get(where, meta, "preprocessing.size_divisor"), 1, 1024):
        raise _fail(where, "preprocessing.size_divisor", "a whole number 1..1024",
                    meta["preprocessing"]["size_divisor"])
    if _get(where, meta, "preprocessing.pad_mode") not in PAD_MODES:
        raise _fail(where, "preprocessing.pad_mode", " | ".join(PAD_MODES), meta["preprocessing"]["pad_mode"])
    mean = _get(where, meta, "normalization.mean")
    if not (isinstance(mean, list) and len(mean) == 3 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                               and 0 <= v <= 1 for v in mean)):
        raise _fail(where, "normalization.mean", "three numbers in [0, 1]", mean)
    names = _get(where, meta, "classes.names")
    if not (isinstance(names, list) and 2 <= len(names) <= 255 and all(isinstance(n, str) for n in names)):
        raise _fail(where, "classes.names", "a list of 2..255 class names", names)
    colors = _get(where, meta, "classes.colors")
    if not (isinstance(colors, list) and len(colors) == len(names) and all(
            isinstance(c, list) and len(c) == 3 and all(_is_int(v, 0, 255) for v in c) for c in colors)):
        raise _fail(where, "classes.colors", f"{len(names)} [r, g, b] colours of whole numbers 0..255", colors)
    return meta
