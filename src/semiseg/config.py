"""Run configuration: every section as a pydantic model, YAML loading, ``--set a.b=c`` overrides, errors that
name the key.

The config sits low in the layers (``docs/architecture.md``, "Layers"): models, engine, pipeline and methods
all read it, so it imports none of them. Loading still needs the chosen method's own options model, which
lives with the method above; :func:`config_from_dict` and :func:`load_config` therefore take the method
lookup as an argument. Everyone else calls the bound versions in :mod:`semiseg.api`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
)

from semiseg.data.normalization import OFFLINE_ENCODERS, Normalization, default_normalization
from semiseg.errors import ConfigError
from semiseg.options import MethodOptions


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

    @field_validator("size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 1:
            raise ValueError("the working size [H, W] must be at least 1 pixel each way")
        return size


class SplitConfig(_Strict):
    seed: int = Field(0, description="split seed")
    labeled: float | int = Field(0.2, description="share (0-1] or count of the training pool that is labeled")
    val: float | int = Field(0.1, description="share or count for validation (model selection)")
    test: float | int | None = Field(0.1, description="share or count for test; ignored when the preset fixes it")
    files: str | None = Field(None, description="folder with labeled/unlabeled/val/test.txt to use as given")
    group_aware: bool = Field(True, description="keep a preset's groups (video sequences) within one split")
    add_labeled: str | None = Field(None, description=(
        "a file of unlabeled stems (one per line, e.g. `semiseg suggest-labels`' labels-to-add.txt) moved into the "
        "labeled split once their masks exist: the split seed's split plus the images you annotated"))


class AugmentConfig(_Strict):
    scale: tuple[float, float] = Field((0.5, 2.0), description="random scale range of the weak augmentation")
    hflip: bool = True
    vflip: bool = False
    pad_label: int = Field(255, description="mask value of padding when the crop exceeds the image")


LabeledLossName = Literal["cross-entropy", "dice", "cross-entropy+dice"]


class TrainConfig(_Strict):
    steps: int = Field(2000, gt=0, description="optimizer steps of one training stage")
    loss: LabeledLossName = Field("cross-entropy", description=(
        "loss of every method's labeled term (teachers, students, warm-ups; dst-cbc rounds: of the labeled half): "
        "cross-entropy (the papers), dice or cross-entropy+dice; in every stage key"))
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
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field("auto", description=(
        "DataLoader worker processes per stream and process; auto: on CUDA up to 4, none on CPU (measured slower)"))
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
    test: bool = Field(True, description=(
        "score the test split at the end; false for hyper-parameter searches, which choose on validation and "
        "must leave test unread (results then carry no test figures)"))


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


class RunConfig(_Strict):
    name: str = Field("run", description="run directory name under out_dir (one folder name, no path)")
    out_dir: str = Field("runs", description="run directories are created under it")
    seed: int = Field(0, description="training seed (initialisation, augmentation, sampling)")
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # SerializeAsAny: dump the subclass's options, not just the base's fields
    method: SerializeAsAny[MethodOptions] = Field(default_factory=MethodOptions, description=(
        "method.name and that method's options (`semiseg methods`); after loading, its own options model"))

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # the run directory is out_dir/name: a path in the name would write outside out_dir
        if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
            raise ValueError("a run name is one folder name: not empty, no '/' or '\\', not starting with '.' "
                             "(choose the parent folder with out_dir)")
        return name

    @field_serializer("method", mode="wrap")
    def _method_with_name(self, options: MethodOptions, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # config.yaml and the fingerprint keep the shape they always had: {"name": ..., <options in order>}
        return {"name": options.name, **handler(options)}


class _UnresolvedRunConfig(RunConfig):
    """Step one of :func:`config_from_dict`: every section validated except ``method``, kept as the mapping
    it was, since its model is known only once its name is looked up (so errors read as they always did)."""

    method: dict[str, Any] = Field(default_factory=dict)  # type: ignore[assignment]


class MethodSpec(Protocol):
    """What loading a config needs of a method class (``semiseg.methods.registry.Method`` is one)."""

    @property
    def options_model(self) -> type[MethodOptions]: ...

    def check_config(self, config: RunConfig, options: MethodOptions) -> None: ...


# ``name -> method class``, raising KeyError("unknown method ...; known: ...") (``methods.registry.get_method``)
MethodLookup = Callable[[str], MethodSpec]


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


def config_from_dict(raw: dict[str, Any], origin: str = "config", *, methods: MethodLookup) -> RunConfig:
    """Validate a whole config; the ``method`` section against the chosen method's own options model (looked
    up with ``methods``), which the returned config then holds. Callers: :func:`semiseg.api.config_from_dict`."""
    try:
        unresolved = _UnresolvedRunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
    options = dict(unresolved.method)
    name = options.pop("name", "supervised")
    try:
        method = methods(name)
    except KeyError as err:
        raise ConfigError(f"{origin}: method.name: {err.args[0]}") from None
    try:
        resolved = method.options_model.model_validate({"name": name, **options})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin, prefix="method.")) from None
    config = RunConfig.model_validate({**dict(unresolved), "method": resolved})
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


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                methods: MethodLookup) -> RunConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``--set`` overrides; the
    method options are resolved with ``methods`` (see :func:`config_from_dict`). Callers:
    :func:`semiseg.api.load_config`."""
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
    return config_from_dict(apply_overrides(raw, overrides or []), origin, methods=methods)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
