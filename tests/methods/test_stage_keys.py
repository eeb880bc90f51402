"""Per method: every option a stage declares is in its key (changing it changes the key), every option the
method has is declared by some stage or read only while planning, and the declared set is what the stage
really reads (tiny end-to-end runs of each method elsewhere fail on an undeclared read)."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from semiseg.methods.registry import list_methods
from semiseg.options import MethodOptions
from tests.method_helpers import method_for

METHODS = [name for name in list_methods() if not name.startswith("example-")]
# options that only change how many stages there are, or that only a plan reads (they reach every stage they
# shape through its steps, its inputs or a label stage's policy, all in the key)
SHAPE = {"generations": 1}


def other_values(options: MethodOptions, name: str) -> list[object]:
    """Values of option ``name`` other than the current one that its field accepts."""
    field = type(options).__pydantic_fields__[name]
    current = getattr(options, name)
    candidates: list[object] = []
    union = [field.annotation] if typing.get_origin(field.annotation) is typing.Literal else \
        typing.get_args(field.annotation)
    for arg in union:
        if typing.get_origin(arg) is typing.Literal:
            candidates += list(typing.get_args(arg))
    if isinstance(current, bool):
        candidates.append(not current)
    elif isinstance(current, int | float):
        candidates += [current * 0.5, current + 1, current * 2, current - 1, 0.5, 1, 2, 0]
    elif isinstance(current, list | tuple):
        candidates += [list(current)[:1] * 2, [*current, *current[-1:]], [0.5, 1.0], [0.1, 0.5, 1.0]]
    elif current is None:
        candidates += [1, 2, 0.5, 100, "epoch"]
    if type(None) in typing.get_args(field.annotation) and current is not None:
        candidates.append(None)
    accepted = []
    for value in candidates:
        if value == current:
            continue
        try:
            type(options).model_validate({**options.model_dump(), name: value})
        except ValidationError:
            continue
        accepted.append(value)
    return accepted


@pytest.mark.parametrize("name", METHODS)
def test_changing_a_declared_option_changes_its_stage_key(name):
    base = method_for(name, **({k: v for k, v in SHAPE.items() if k in
                                type(method_for(name).options).__pydantic_fields__}))
    shape = {k: getattr(base.options, k) for k in SHAPE if k in type(base.options).__pydantic_fields__}
    checked = 0
    for ref in base.pipeline.refs.values():
        if ref.key_hash is None:
            continue
        for option in ref.options:
            values = other_values(base.options, option)
            assert values, f"{name}: no other value found for option {option!r}"
            changed = method_for(name, **{**shape, option: values[0]})
            if ref.name in changed.pipeline.refs:  # a changed option may also reshape the plan
                assert changed.pipeline[ref.name].key_hash != ref.key_hash, (name, ref.name, option, values[0])
            checked += 1
    options = type(base.options).option_names()
    assert checked or not options or name in ("supervised",), f"{name}: no stage declares any option"


@pytest.mark.parametrize("name", METHODS)
def test_an_option_no_stage_declares_changes_no_stage_but_through_the_plan(name):
    """An option no stage declares may still shape the plan (steps, inputs, label policies: in the keys);
    it must never leave every key unchanged unless it only matters after the stages (what is delivered)."""
    base = method_for(name, **{k: v for k, v in SHAPE.items()
                               if k in type(method_for(name).options).__pydantic_fields__})
    shape = {k: getattr(base.options, k) for k in SHAPE if k in type(base.options).__pydantic_fields__}
    declared = {o for ref in base.pipeline.refs.values() for o in ref.options}
    base_keys = [ref.key_hash for ref in base.pipeline.refs.values()]
    for option in type(base.options).option_names():
        if option in declared or option in shape:
            continue
        for value in other_values(base.options, option)[:1]:
            changed = method_for(name, **{**shape, option: value})
            keys = [ref.key_hash for ref in changed.pipeline.refs.values()]
            delivered = changed.final_net() != base.final_net()
            assert keys != base_keys or delivered, (name, option, value)
