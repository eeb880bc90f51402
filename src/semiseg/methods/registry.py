"""Method registry: a method is a registered class with its own declared options."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

# MethodOptions lives with the config (which holds the chosen method's options); re-exported for method files
from semiseg.config import MethodOptions, RunConfig

if TYPE_CHECKING:
    from torch import nn

    from semiseg.pipeline.context import RunContext
    from semiseg.pipeline.stages import Stage

__all__ = ["Method", "MethodOptions", "get_method", "list_methods", "register"]


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


# No "import every method" here: this module is semiseg.methods.registry, and Python runs the package's
# __init__ (which imports every method module, so each registers itself) before any of its modules can be
# imported. By the time anyone calls get_method, every method is registered, and the registry imports
# nothing of the methods: no circle.


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> dict[str, type[Method]]:
    return dict(sorted(_REGISTRY.items()))
