"""A method's options, and the slice of them one stage declares it reads.

A stage is reused when its content key matches, so every option a stage reads must be in its key. A stage
therefore *declares* the options it reads (``Pipeline.train(..., options=("threshold", ...))``): the pipeline
puts exactly those into the key and hands the stage's task an :class:`OptionSlice` holding only them. While
the stage runs, the method's own options object is sealed too: reading an option the running stage did not
declare (from a closure over ``self.options``, or ``run.config.method``) raises
:class:`UndeclaredOptionError` on the stage's first run, instead of silently reusing a stage trained with
another value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

# (stage, the option names it declared) while a stage's work runs in this context; None: nothing sealed
_RUNNING: ContextVar[tuple[str, frozenset[str]] | None] = ContextVar("semiseg_running_stage", default=None)


class UndeclaredOptionError(RuntimeError):
    """A stage read a method option it did not declare (a bug of the method, not of the user's input)."""


def _undeclared(stage: str, option: str) -> UndeclaredOptionError:
    return UndeclaredOptionError(
        f"stage {stage!r} reads method option {option!r} but does not declare it: add it to the stage's "
        "options=(...) so that it goes into the stage key (otherwise a run with another value would reuse "
        "this stage)")


class MethodOptions(BaseModel):
    """Base of every method's options (each method declares a subclass, ``Method.options_model``): unknown
    keys are errors. A loaded run config holds an instance of the chosen method's subclass."""

    model_config = ConfigDict(extra="forbid")

    # Which method, not one of its options: left out of the options' own dump (what stage keys hash as a
    # method's options) and put back first by RunConfig's dump, so config.yaml keeps its shape for runs on disk.
    name: str = Field("supervised", exclude=True, description="the method (`semiseg methods` lists them)")

    def __getattribute__(self, attr: str) -> Any:
        running = _RUNNING.get()
        if (running is not None and attr != "name" and attr in type(self).__pydantic_fields__
                and attr not in running[1]):
            raise _undeclared(running[0], attr)
        return super().__getattribute__(attr)

    @classmethod
    def option_names(cls) -> list[str]:
        """Every option (``name`` is the method, not an option)."""
        return [n for n in cls.__pydantic_fields__ if n != "name"]


class OptionSlice(BaseModel):
    """The options one stage declared, typed as the method declares them; any other name is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stage_name: str = Field("", exclude=True)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            return super().__getattr__(attr)  # type: ignore[misc]
        raise _undeclared(self.stage_name, attr)


@cache
def _slice_model(options_model: type[MethodOptions], names: tuple[str, ...]) -> type[OptionSlice]:
    fields = options_model.__pydantic_fields__
    return create_model(f"{options_model.__name__}Slice", __base__=OptionSlice,
                        **{n: (fields[n].annotation, fields[n]) for n in names})  # type: ignore[call-overload]


ALL = "all"
"""``options=ALL``: the stage reads every option of its method (its task gets the options object itself)."""

Declared = Sequence[str] | str
"""What a stage declares: option names, or :data:`ALL`."""


def declared_names(options: MethodOptions, declared: Declared, stage: str) -> tuple[str, ...]:
    """The declared option names, checked against the method's options model (a typo fails at plan time)."""
    known = type(options).option_names()
    if declared == ALL:
        return tuple(known)
    if isinstance(declared, str):
        raise TypeError(f"stage {stage!r}: options= takes a sequence of option names or ALL, got {declared!r}")
    unknown = [n for n in declared if n not in known]
    if unknown:
        raise ValueError(f"stage {stage!r} declares option(s) {unknown} that {type(options).__name__} lacks "
                         f"(it has: {', '.join(known)})")
    return tuple(dict.fromkeys(declared))


def option_slice(options: MethodOptions, declared: Declared, stage: str) -> MethodOptions | OptionSlice:
    """What a stage's task is handed: the options object itself for :data:`ALL`, else a slice of the
    declared options only (read before any stage is sealed)."""
    if declared == ALL:
        return options
    names = declared_names(options, declared, stage)
    values = {n: getattr(options, n) for n in names}
    return _slice_model(type(options), names)(stage_name=stage, **values)


def key_of(options: MethodOptions, declared: Declared, stage: str) -> dict[str, Any]:
    """The declared options as they go into the stage key (JSON values)."""
    return options.model_dump(mode="json", include=set(declared_names(options, declared, stage)))


@contextlib.contextmanager
def reading_only(stage: str, names: Sequence[str]) -> Iterator[None]:
    """While the body runs (a stage's work), a method's options object answers only ``names``."""
    token = _RUNNING.set((stage, frozenset(names)))
    try:
        yield
    finally:
        _RUNNING.reset(token)
