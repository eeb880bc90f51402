"""Method registry: a method is a registered class with its own declared options."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, get_args

# MethodOptions lives with the config (which holds the chosen method's options); re-exported for method files
from semiseg.config import MethodOptions, RunConfig
from semiseg.pipeline.plan import NetOf, Pipeline, Source, Teacher

if TYPE_CHECKING:
    from torch import nn

    from semiseg.pipeline.context import RunContext
    from semiseg.pipeline.stages import Stage

__all__ = ["Method", "MethodOptions", "get_method", "list_methods", "register"]


OptionsT = TypeVar("OptionsT", bound=MethodOptions)


class Method(Generic[OptionsT]):
    """A semi-supervised method: the stages it declares on a :class:`Pipeline` and the model it delivers.

    A subclass names its options model once, ``class MyMethod(Method[MyOptions])``, and implements
    :meth:`plan`; the pipeline layer runs, resumes and reuses the stages. The delivered model is by default
    the last training stage's net as selected on validation (:meth:`final_stage`, :meth:`final_net`).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    options_model: ClassVar[type[MethodOptions]] = MethodOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options_model" not in cls.__dict__:  # taken from ``Method[Options]`` unless the class says otherwise
            for base in getattr(cls, "__orig_bases__", ()):
                args = get_args(base)
                if args and isinstance(args[0], type) and issubclass(args[0], MethodOptions):
                    cls.options_model = args[0]

    def __init__(self, run: RunContext, options: OptionsT) -> None:
        self.run, self.options = run, options
        self._pipeline: Pipeline | None = None

    @classmethod
    def check_config(cls, config: RunConfig, options: OptionsT) -> None:
        """Raise ConfigError for options the rest of the config cannot support (runs before anything is written)."""

    def plan(self, pipeline: Pipeline) -> None:
        """Declare the stages, in order, on ``pipeline`` (``train``, ``label``, ``add``)."""
        raise NotImplementedError

    @property
    def pipeline(self) -> Pipeline:
        """The planned stages (planned once, before anything runs)."""
        if self._pipeline is None:
            pipeline = Pipeline(self.run)
            self.plan(pipeline)
            self._pipeline = pipeline
        return self._pipeline

    def stages(self) -> list[Stage]:
        return self.pipeline.stages

    def teach(self, outer: Pipeline) -> Teacher:
        """Plan this method inside another method's run, as its teacher: the stages join ``outer`` named
        ``<name>.<stage>`` and keyed as this method's own run keys them (one under the same ``out_dir`` shares
        them). Returns the delivered model. No diagnostics stage: the outer run's describe the run."""
        pipeline = outer.nested(f"{self.name}.", self.options)
        self.plan(pipeline)
        self._pipeline = pipeline
        net = self.final_net()
        return self.final_stage() if net is None else NetOf(self.final_stage(), net)

    def final_stage(self) -> Source:
        """The stage whose model is delivered: the last training stage."""
        return self.pipeline.last_training()

    def final_net(self) -> str | None:
        """Which net of the final stage is delivered (None: the one it validated)."""
        return None

    def final_model(self) -> nn.Module:
        """The delivered model (weights loaded, eval mode) after every stage is DONE."""
        return self.final_stage().resolve().model(net=self.final_net())

    def trained_steps(self) -> int:
        """Optimizer steps behind the delivered network, counted from its initialisation (a net fine-tuned
        from a teacher counts the teacher's steps too): what ``supervised`` must train for to be this
        method's compute-matched control."""
        return self.pipeline.steps_behind(self.final_stage())


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
