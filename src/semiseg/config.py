"""Run configuration: YAML validated with pydantic, ``--set a.b=c`` overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from semiseg.errors import ConfigError
from semiseg.models.factory import ModelConfig, check_weights


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: str = Field("synthetic", description="preset name (kvasir-seg, polyp, camvid, ...) or a folder path")
    root: str | None = Field(None, description="dataset folder of a preset (default $SEMISEG_DATA/<preset>)")
    options: dict[str, Any] = Field(default_factory=dict, description="preset options, e.g. synthetic n/kind")
    size: tuple[int, int] = Field((128, 128), description="working size H W: images are decoded to it once")
    cache_dir: str | None = Field(None, description="decoded cache (default $SEMISEG_CACHE or ~/.cache/semiseg)")
    benchmark_gt: bool = Field(
        False, description="benchmark mode: the unlabeled images' masks may be read for diagnostics only")


class SplitConfig(_Strict):
    seed: int = Field(0, description="split seed")
    labeled: float | int = Field(0.2, description="share (0-1] or count of the training pool that is labeled")
    val: float | int = Field(0.1, description="share or count for validation (model selection)")
    test: float | int | None = Field(0.1, description="share or count for test; ignored when the preset fixes it")
    files: str | None = Field(None, description="folder with labeled/unlabeled/val/test.txt to use as given")
    group_aware: bool = Field(True, description="keep a preset's groups (video sequences) within one split")


class AugmentConfig(_Strict):
    scale: tuple[float, float] = Field((0.5, 2.0), description="random scale range of the weak augmentation")
    hflip: bool = True
    vflip: bool = False
    pad_label: int = Field(255, description="mask value of padding when the crop exceeds the image")


class TrainConfig(_Strict):
    steps: int = Field(2000, gt=0, description="optimizer steps of one training stage")
    batch_size: int = Field(8, gt=0, description="labeled images per step and process")
    unlabeled_batch_size: int | None = Field(None, description="unlabeled images per step (default batch_size)")
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, description="SGD momentum")
    head_lr_mult: float = Field(1.0, gt=0, description="LR multiplier of decoder + classifier (10 in ST++/GTA)")
    lr_schedule: Literal["poly", "constant"] = "poly"
    warmup: float = Field(0.05, ge=0, lt=1, description=(
        "linear LR warm-up over this fraction of a training stage's steps (0: none)"))
    poly_power: float = 0.9
    lr_scaling: Literal["linear", "none"] = Field(
        "linear", description="with N processes the global batch is N x batch_size; linear: lr x N")
    amp: Literal["none", "fp16", "bf16", "auto"] = Field(
        "auto", description="auto: fp16 on CUDA, none on CPU; bf16 is optional on CPU")
    grad_clip: float | None = Field(None, description="max gradient norm (none: no clipping)")
    eval_every: int = Field(200, gt=0, description="validate every N steps (and at the end)")
    checkpoint_every: int = Field(100, gt=0, description="write last.pt every N steps")
    num_workers: int = Field(0, ge=0, description="DataLoader workers per process")
    deterministic: bool = Field(False, description="deterministic algorithms (bit-exact resume on CPU)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    threads: int | None = Field(None, description="torch CPU threads (default: torch's choice)")
    sync_bn: bool = Field(False, description="SyncBatchNorm under torchrun")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels-last (NHWC) weights and inputs; auto: on (faster convolutions, measured)")
    tensorboard: bool = False
    progress: bool = True
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class EvalConfig(_Strict):
    protocol: Literal["resize", "whole", "center_crop", "sliding_window"] = "resize"
    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    val_metric: str | None = Field(None, description="selection metric (default dice for binary, miou else)")


class RunConfig(_Strict):
    name: str = Field("run", description="run directory name under out_dir (one folder name, no path)")
    out_dir: str = Field("runs", description="run directories are created under it")
    seed: int = Field(0, description="training seed (initialisation, augmentation, sampling)")
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "supervised"})

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # the run directory is out_dir/name: a path in the name would write outside out_dir
        if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
            raise ValueError("a run name is one folder name: not empty, no '/' or '\\', not starting with '.' "
                             "(choose the parent folder with out_dir)")
        return name

    def method_options(self) -> BaseModel:
        from semiseg.methods.registry import get_method

        options = dict(self.method)
        return get_method(options.pop("name")).options_model(**options)


def _format_errors(err: ValidationError, origin: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"])
        kind = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {kind}" + ("" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"))
    if len(lines) == 1:  # the usual case: one line, like every other error
        return f"{origin}: invalid configuration: {lines[0].strip()}"
    return f"{origin}: invalid configuration\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml-parsed c)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], origin: str = "config") -> RunConfig:
    """Validate a whole config; the ``method`` section against the chosen method's own options model."""
    from semiseg.methods.registry import get_method

    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
    options = dict(config.method)
    name = options.pop("name", "supervised")
    try:
        method = get_method(name)
    except KeyError as err:
        raise ConfigError(f"{origin}: method.name: {err.args[0]}") from None
    try:
        resolved = method.options_model.model_validate(options)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin, prefix="method.")) from None
    config.method = {"name": name, **resolved.model_dump(mode="json")}
    try:
        check_weights(config.model)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    config.model = config.model.resolved()  # the input normalisation is decided once and recorded
    try:
        method.check_config(config, resolved)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from None
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key {key!r} appears twice in one section (lines {seen[key]} and "
                              f"{key_node.start_mark.line + 1}); keep one")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def bundled_config(name: str | Path) -> Path | None:
    """A protocol config shipped with semiseg (``polyp``, ``camvid``, ``demo``) when ``name`` is not a file."""
    if Path(name).is_file() or "/" in str(name) or str(name).endswith((".yaml", ".yml")):
        return None
    from importlib.resources import files

    candidate = Path(str(files("semiseg") / "configs" / f"{name}.yaml"))
    return candidate if candidate.is_file() else None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = bundled_config(path) or Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a safe loader
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides or []), origin)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
