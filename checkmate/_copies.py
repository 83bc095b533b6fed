"""Copies of the engine's pydantic models: templates, stages and the states handed to stages.

A copy goes through the model (serialise, then validate) rather than
``deepcopy``: several times faster, and it re-checks what it copies. Where a
part cannot change (frozen history entries, immutable field values), it is
shared instead of copied.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from .models import BaseStageState
from .stage import BaseStage, _assign, _construct

__all__ = ["copy_model", "copy_state", "copy_with_state", "round_trip"]

_M = TypeVar("_M", bound=BaseModel)
_S_M = TypeVar("_S_M", bound=BaseStage[Any])
_St = TypeVar("_St", bound=BaseStageState[Any])
_MODEL_DUMP = BaseModel.model_dump
_MODEL_VALIDATE = BaseModel.model_validate.__func__  # type: ignore[attr-defined]


def _uses_base_methods(cls: type[BaseModel]) -> bool:
    """Tell whether ``cls`` dumps and validates with pydantic's own methods.

    Then its serializer and validator may be called directly (what those
    methods do, without their overhead).
    """
    return cls.model_dump is _MODEL_DUMP and cls.model_validate.__func__ is _MODEL_VALIDATE  # type: ignore[attr-defined]


def round_trip(model: _M) -> _M:
    """``model_validate(model_dump(round_trip=True))``: a validated deep copy.

    Calls the model's serializer and validator directly (what those two
    methods do) unless its class overrides either method.
    """
    cls = type(model)
    if _uses_base_methods(cls):
        dumped = cls.__pydantic_serializer__.to_python(model, round_trip=True)
        return cls.__pydantic_validator__.validate_python(dumped)  # type: ignore[no-any-return]
    return cls.model_validate(model.model_dump(round_trip=True))


_WITHOUT_STATE = {"state"}
_IMMUTABLE = frozenset({str, int, float, bool, type(None), bytes})
_FIELD_NAMES: dict[type, frozenset[str]] = {}


def copy_with_state(stage: _S_M, state: BaseStageState[Any]) -> _S_M:
    """A copy of a stage (template) that holds ``state`` itself instead of its own.

    Only the stage's other fields are copied; falls back to a whole copy.
    """
    cls = type(stage)
    values = stage.__dict__
    fields = _FIELD_NAMES.get(cls)
    if fields is None:
        fields = _FIELD_NAMES[cls] = frozenset(cls.model_fields)
    if (
        not stage.__pydantic_private__
        and not stage.__pydantic_extra__
        and values.keys() <= fields  # nothing cached beside the fields
        and all(type(value) in _IMMUTABLE for key, value in values.items() if key != "state")
    ):
        # Nothing to copy but the state: the other fields are immutable values.
        return _construct(
            cls,
            {**values, "state": state},
            set(stage.__pydantic_fields_set__),
            stage.__pydantic_extra__,
            stage.__pydantic_private__,
        )
    if _uses_base_methods(cls):
        try:
            dumped = cls.__pydantic_serializer__.to_python(
                stage, round_trip=True, exclude=_WITHOUT_STATE
            )
            dumped["state"] = state
            copy: _S_M = cls.__pydantic_validator__.validate_python(dumped)
        except (ValueError, TypeError):
            pass
        else:
            if copy.state is state:
                return copy
    copy = copy_model(stage)
    copy.state = state
    return copy


_HISTORY = {"history"}
_HISTORY_TYPE = BaseStageState.model_fields["history"].annotation
_SHARES_HISTORY: dict[type, bool] = {}


def _history_shareable(cls: type[BaseStageState[Any]]) -> bool:
    """Tell whether a copy of a ``cls`` state may share the history entries of the original.

    History entries are frozen, so sharing them is safe unless the class could
    treat its history differently from the base class (its own validators,
    serialisers, or dump/validate methods, another history type, or a frozen one).
    """
    shareable = _SHARES_HISTORY.get(cls)
    if shareable is None:
        deco = cls.__pydantic_decorators__
        per_field = {f for d in deco.field_validators.values() for f in d.info.fields}
        per_field.update(f for d in deco.field_serializers.values() for f in d.info.fields)
        history = cls.model_fields["history"]
        shareable = _SHARES_HISTORY[cls] = (
            history.annotation == _HISTORY_TYPE
            and not history.frozen
            and not cls.model_config.get("frozen")
            and _uses_base_methods(cls)
            and not (
                deco.validators
                or deco.root_validators
                or deco.model_validators
                or deco.model_serializers
            )
            and not per_field & {"history", "*"}
        )
    return shareable


def copy_state(state: _St) -> _St:
    """A validated deep copy of a stage state, in a new list of the same history entries.

    The entries are frozen: copying them again (most of the cost of a copy once
    a stage has run) would change nothing. Falls back to `copy_model`.
    """
    cls = type(state)
    if _history_shareable(cls):
        try:
            dumped = cls.__pydantic_serializer__.to_python(state, round_trip=True, exclude=_HISTORY)
            copy: _St = cls.__pydantic_validator__.validate_python(dumped)
        except (ValueError, TypeError):
            pass
        else:
            _assign(copy, "history", list(state.history))
            return copy
    return copy_model(state)


def copy_model(model: _M) -> _M:
    """A deep copy made through the model (several times faster than deepcopy).

    Falls back to deepcopy for models whose values do not round-trip.
    """
    try:
        return round_trip(model)
    except (ValueError, TypeError):
        return model.model_copy(deep=True)
