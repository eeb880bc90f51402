"""Method registry: a method is a registered class with its own declared options."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import nn

    from semiseg.config import RunConfig
    from semiseg.pipeline.context import RunContext
    from semiseg.pipeline.stages import Stage


class MethodOptions(BaseModel):
    """Base of every method's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Method:
    """A semi-supervised method: a list of persisted stages and the model it finally delivers."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    options_model: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, run: RunContext, options: MethodOptions) -> None:
        self.run, self.options = run, options

    @classmethod
    def check_config(cls, config: RunConfig, options: MethodOptions) -> None:
        """Raise ConfigError for options the rest of the config cannot support (runs before anything is written)."""

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def final_model(self) -> nn.Module:
        """The delivered model (weights loaded, eval mode) after every stage is DONE."""
        raise NotImplementedError

    def trained_steps(self) -> int:
        """Optimizer steps behind the delivered network, counted from its initialisation (a net fine-tuned
        from a teacher counts the teacher's steps too): what ``supervised`` must train for to be this
        method's compute-matched control. Default: one training stage (``train.steps``)."""
        return self.run.config.train.steps


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    import semiseg.methods  # noqa: F401 - importing the package registers every method


def get_method(name: str) -> type[Method]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> dict[str, type[Method]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))
