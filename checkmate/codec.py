"""The persisted format of a stage object: encode and strictly decode it.

A stage object is the JSON dump of the stage (its fields, with the state under
its own field names) plus a ``checkmate`` member that records the format
version, the stage's class and its position in the task::

    {"checkmate": {"format": 1, "stage_class": "etl.Extract", "position": 0,
                   "stage_count": 3},
     "stage_name": "extract", "description": "", "timezone": "UTC",
     "state": {"task_id": "...", "status": "COMPLETE", "attempts": 1, ...}}

Decoding never trusts the data: it is parsed as JSON, then validated through
the template's own state model (no pickle, no class looked up by name).
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, PydanticUserError, ValidationError, create_model
from pydantic_core import PydanticSerializationError, from_json

from .errors import CorruptStateError, StateMismatchError, StateSerializationError
from .models import BaseStageState, StageStateHistoryEntry, StageStatus
from .stage import BaseStage
from .transitions import can_transition

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "check_history",
    "FORMAT_VERSION",
    "HistoryJSON",
    "META_KEY",
    "class_path",
    "decode_state",
    "encode_stage",
    "meta_head",
    "meta_prefix",
    "meta_prefix_from",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_KEY = "checkmate"

_MODEL_DUMP_JSON = BaseModel.model_dump_json


def class_path(cls: type) -> str:
    """Return ``module.QualName`` for a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(stored: str, expected: str) -> bool:
    # A class defined in a script is "__main__.X" when the script runs and
    # "script.X" when imported: compare qualified names only in that case.
    if stored == expected:
        return True
    stored_mod, _, stored_name = stored.partition(".")
    expected_mod, _, expected_name = expected.partition(".")
    if "__main__" in (stored_mod, expected_mod):
        return stored.rpartition(".")[2] == expected.rpartition(".")[2] and bool(
            stored_name and expected_name
        )
    return False


def meta_prefix(stage: BaseStage[Any], position: int, stage_count: int, epoch: int | None) -> bytes:
    """Return the bytes that open a stage object: ``{"checkmate": {...},``.

    ``epoch`` is the lease epoch of the writer (None without a lease).
    """
    return meta_prefix_from(meta_head(type(stage)), position, stage_count, epoch)


def meta_head(stage_class: type) -> bytes:
    """The part of `meta_prefix` that depends only on the stage's class."""
    return b'{"%s":{"format":%d,"stage_class":%s' % (
        META_KEY.encode(),
        FORMAT_VERSION,
        json.dumps(class_path(stage_class)).encode(),
    )


def meta_prefix_from(head: bytes, position: int, stage_count: int, epoch: int | None) -> bytes:
    """`meta_prefix` from the class's `meta_head` (the same bytes, built faster)."""
    if epoch is None:
        return head + b',"position":%d,"stage_count":%d},' % (position, stage_count)
    return head + b',"position":%d,"stage_count":%d,"epoch":%d},' % (
        position,
        stage_count,
        epoch,
    )


class HistoryJSON:
    """The JSON of one stage's history entries, kept from one write to the next.

    History entries are frozen and only ever appended, so each is serialised
    once: a status change of a stage with a long history then costs the JSON
    of its new entry, not of all of them.
    """

    __slots__ = ("entries", "joined")

    def __init__(self) -> None:
        self.entries: list[StageStateHistoryEntry] = []
        self.joined = b""

    def of(self, history: list[StageStateHistoryEntry]) -> bytes:
        """The comma-joined JSON of ``history``'s entries."""
        known = len(self.entries)
        # Identical entries compare in C without calling __eq__.
        if len(history) < known or history[:known] != self.entries:
            self.entries, self.joined, known = [], b"", 0
        new = history[known:]
        if new:
            parts = [_ENTRY_TO_JSON(entry) for entry in new]
            if known:
                parts.insert(0, self.joined)
            self.joined = b",".join(parts)
            self.entries.extend(new)
        return self.joined


_ENTRY_TO_JSON = StageStateHistoryEntry.__pydantic_serializer__.to_json
_SPLICE_MIN_ENTRIES = 32
_EXCLUDE_HISTORY = {"state": {"history"}}
# (stage class, state class) -> whether the spliced JSON equals the plain one.
_SPLICE_OK: dict[tuple[type, type], bool] = {}
_FIXED_STATE_FIELDS = ("task_id", "stage_name", "status", "attempts", "history")


def _splice_allowed(stage_class: type[BaseModel], state_class: type[BaseModel]) -> bool:
    """Tell whether both classes serialise as the engine's base classes do."""
    base = BaseStageState.model_fields
    fields = state_class.model_fields
    for cls in (stage_class, state_class):
        decorators = cls.__pydantic_decorators__
        if decorators.model_serializers or decorators.field_serializers:
            return False
    return state_class.model_dump_json is _MODEL_DUMP_JSON and all(
        name in fields
        and fields[name].annotation == base[name].annotation
        and fields[name].alias is None
        for name in _FIXED_STATE_FIELDS
    )


def _spliced_parts(stage: BaseStage[Any], history: HistoryJSON) -> list[Buffer] | None:
    """The stage's JSON without its opening brace, its history spliced in from ``history``.

    Returned as pieces to join (views of one serialisation, no copies of a large
    state); None if a splice is not possible. Everything before the state's
    ``attempts`` member is a string, so the first ``"attempts":N,`` in the JSON
    is that member, and ``history`` follows it. The first splice of each pair
    of classes is checked against the plain serialisation.
    """
    state = stage.state
    key = (type(stage), type(state))
    ok = _SPLICE_OK.get(key)
    if ok is None:
        ok = _SPLICE_OK[key] = _splice_allowed(*key)
        checked = False
    else:
        checked = True
    if not ok:
        return None
    serializer = stage.__pydantic_serializer__
    body = serializer.to_json(stage, warnings="error", exclude=_EXCLUDE_HISTORY)
    marker = b'"attempts":%d,' % state.attempts
    at = body.find(marker)
    if at < 0:
        _SPLICE_OK[key] = False
        return None
    at += len(marker)
    view = memoryview(body)
    parts: list[Buffer] = [view[1:at], b'"history":[', history.of(state.history), b"],", view[at:]]
    if not checked and b"".join((b"{", *parts)) != serializer.to_json(stage, warnings="error"):
        logger.debug("history splice disabled for %s", class_path(type(stage)))
        _SPLICE_OK[key] = False
        return None
    return parts


def encode_stage(
    stage: BaseStage[Any], prefix: bytes, task_id: str, history: HistoryJSON | None = None
) -> bytes:
    """Serialise a stage to its object bytes (``prefix`` from `meta_prefix`).

    With ``history`` (kept per stage between calls), a long history's JSON is
    reused instead of being made again.

    Raises:
        StateSerializationError: The stage or its state holds a value JSON cannot hold.
    """
    try:
        # The pieces of the stage's JSON after its opening brace (``prefix`` has one).
        parts: list[Buffer] | None = None
        if type(stage).model_dump_json is _MODEL_DUMP_JSON:
            if history is not None and len(stage.state.history) >= _SPLICE_MIN_ENTRIES:
                parts = _spliced_parts(stage, history)
            if parts is None:
                # What model_dump_json does, without its decode to str (the encoder's
                # bytes are UTF-8 already).
                body = stage.__pydantic_serializer__.to_json(stage, warnings="error")
                parts = [memoryview(body)[1:]]
        else:
            parts = [memoryview(stage.model_dump_json(warnings="error").encode())[1:]]
    except (PydanticSerializationError, ValueError, TypeError) as exc:
        raise StateSerializationError(
            f"stage {stage.stage_name!r} of task {task_id!r} cannot be saved: its state "
            f"holds a value that is not JSON-serialisable ({exc}); keep only JSON-friendly "
            "types (or Pydantic models of them) in the state",
            task_id=task_id,
            stage_name=stage.stage_name,
        ) from exc
    data = b"".join((prefix, *parts))  # the one copy of a large state
    if _has_long_digit_run(data) and _has_huge_int(data):
        raise StateSerializationError(
            f"stage {stage.stage_name!r} of task {task_id!r} cannot be saved: its state holds "
            "an integer of more than 4300 digits, which JSON readers refuse; store it as a "
            "string",
            task_id=task_id,
            stage_name=stage.stage_name,
        )
    return data


def _has_long_digit_run(data: bytes) -> bool:
    """Tell whether ``data`` holds 4,301 digits in a row, without scanning all of it.

    Such a run covers two consecutive bytes of every stride-``_STRIDE`` sample,
    so only the neighbourhoods of consecutive digit samples are searched.
    """
    if len(data) < _HUGE_DIGITS:
        return False
    samples = data[::_STRIDE]
    for i in range(len(samples) - 1):
        if (
            samples[i] in _DIGITS
            and samples[i + 1] in _DIGITS
            and data[i * _STRIDE : (i + 1) * _STRIDE + 1].isdigit()
        ):
            start = max(0, i * _STRIDE - _HUGE_DIGITS)
            if _LONG_DIGITS.search(data, start, (i + 1) * _STRIDE + _HUGE_DIGITS):
                return True
    return False


def _has_huge_int(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return True
    return False


def _corrupt(obj_name: str, task_id: str, stage_name: str, reason: str) -> CorruptStateError:
    return CorruptStateError(
        f"persisted object {obj_name!r} of task {task_id!r} is corrupt: {reason}. The engine "
        "left it untouched; restore it from a backup, or delete the task "
        "(unbind(clean=True)) to start over",
        task_id=task_id,
        stage_name=stage_name,
        obj_name=obj_name,
    )


def check_history(state: BaseStageState[Any]) -> str | None:
    """Return what is wrong with a state's history (order, transitions, attempts), or None."""
    previous: StageStatus | None = None
    last_attempt = 0
    if state.attempts > _MAX_ATTEMPTS:
        return "it records an impossible number of attempts"
    for index, entry in enumerate(state.history):
        if entry.attempt > _MAX_ATTEMPTS:
            return f"history entry {index} records an impossible attempt number"
        if previous is not None and entry.begin_status is not previous:
            return f"history entry {index} begins at {entry.begin_status}, not {previous}"
        if not can_transition(entry.begin_status, entry.end_status):
            change = f"{entry.begin_status} -> {entry.end_status}"
            return f"history entry {index} records an impossible change {change}"
        if entry.attempt < last_attempt:
            return f"history entry {index} goes back to attempt {entry.attempt}"
        previous = entry.end_status
        last_attempt = entry.attempt
    if not state.history:
        return "it has no history (a persisted stage starts with UNBOUND -> CREATED)"
    first = state.history[0]
    if first.begin_status is not StageStatus.UNBOUND or first.attempt != 0:
        return "its history does not start with the stage's creation (UNBOUND -> CREATED)"
    if previous is not state.status:
        return f"the history ends at {previous} but the status is {state.status}"
    # attempts is the last recorded attempt, or one less after an interrupted run
    # that was not counted (KeyboardInterrupt / SystemExit).
    if state.attempts not in (last_attempt, last_attempt - 1):
        return f"the history records attempt {last_attempt} but attempts is {state.attempts}"
    return None


def parse_json(data: bytes) -> Any:
    """Parse JSON as the engine writes it (NaN and Infinity allowed).

    Raises:
        ValueError: The bytes are not valid JSON (this includes integers of
            more than 4300 digits, which the engine never writes).
    """
    return from_json(data, allow_inf_nan=True)


_HUGE_DIGITS = 4301  # the first integer length Python's JSON reader refuses
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % _HUGE_DIGITS)
_STRIDE = _HUGE_DIGITS // 2
_DIGITS = frozenset(b"0123456789")
_MAX_ATTEMPTS = 10**9


_META_TYPES: dict[str, type] = {
    "format": int,
    "stage_class": str,
    "position": int,
    "stage_count": int,
    "epoch": int,
}
_REQUIRED_META = ("format", "stage_class", "position", "stage_count")


def _check_meta(meta: dict[str, Any]) -> str | None:
    unknown = sorted(set(meta) - set(_META_TYPES))
    if unknown:
        return f"unknown {META_KEY!r} member(s) {unknown}"
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        return f"{META_KEY!r} lacks {missing}"
    for key, value in meta.items():
        kind = _META_TYPES[key]
        if type(value) is not kind:  # exact: true and 1.0 are not positions
            return f"{META_KEY}.{key} is {value!r}, not of type {kind.__name__}"
    return None


def _check_stage_fields(template: BaseStage[Any], doc: dict[str, Any]) -> str | None:
    """Validate the stage's own fields (everything but the state) with the stage model.

    Members the stage class no longer has are ignored: a task may be resumed
    by a newer version of its stages, and only the state is loaded anyway.
    """
    known = type(template).model_fields
    fields = {key: value for key, value in doc.items() if key != META_KEY and key in known}
    fields["state"] = template.state  # validated on its own, below
    try:
        type(template).model_validate(fields)
    except (ValidationError, ValueError, TypeError) as exc:
        return f"the stage's fields fail validation ({exc})"
    return None


_NOT_STORED = {"state", "volatile_engine_ref"}


def _template_fields(template: BaseStage[Any]) -> dict[str, Any]:
    """The template's fields as they are stored (JSON values), but its state."""
    fields: dict[str, Any] = template.__pydantic_serializer__.to_python(
        template, mode="json", exclude=_NOT_STORED, round_trip=True
    )
    return fields


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})
_ABSENT = object()


def _same_fields(template: BaseStage[Any], fields: dict[str, Any]) -> bool:
    """Tell whether a stored object's stage fields are the template's own.

    Plain values (strings, numbers, booleans, None) are compared directly, type
    and value, as JSON parses them; anything else through `_template_fields`.
    Either way a stored object whose fields are the template's own needs no
    validation of them.
    """
    if not (type(template).__pydantic_computed_fields__ or template.__pydantic_extra__):
        for key, value in template.__dict__.items():
            if key in _NOT_STORED:
                continue
            if type(value) not in _JSON_SCALARS:
                break
            stored = fields.get(key, _ABSENT)
            if type(stored) is not type(value) or stored != value:
                return False
        else:
            return True
    known = _template_fields(template)
    return {k: v for k, v in fields.items() if k in known} == known


class _Meta(BaseModel):
    """The ``checkmate`` member of a stage object, with exact types."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: int
    stage_class: str
    position: int
    stage_count: int
    epoch: int = -1


# (stage class, state class) -> a validator of whole stage objects of them, or None.
_OBJECT_VALIDATORS: dict[tuple[type, type], Any] = {}
_MODEL_VALIDATE = BaseModel.model_validate.__func__  # type: ignore[attr-defined]


def _object_validator(stage_class: type, state_class: type) -> Any:
    """A validator of a whole stage object: its meta member, its state, any other members.

    None where the state class validates in its own way (it overrides
    ``model_validate``) or no such model can be made.
    """
    key = (stage_class, state_class)
    if key not in _OBJECT_VALIDATORS:
        validator = None
        if state_class.model_validate.__func__ is _MODEL_VALIDATE:  # type: ignore[attr-defined]
            try:
                model = create_model(
                    "StageObject",
                    __config__=ConfigDict(extra="allow"),
                    checkmate=(_Meta, ...),
                    state=(state_class, ...),
                )
                validator = model.__pydantic_validator__
            except (TypeError, ValueError, PydanticUserError):  # pragma: no cover - defensive
                validator = None
        _OBJECT_VALIDATORS[key] = validator
    return _OBJECT_VALIDATORS[key]


def _decode_fast(
    template: BaseStage[Any], data: bytes, task_id: str, position: int, stage_count: int
) -> BaseStageState[Any] | None:
    """The state of a valid object of this stage, parsed and validated in one pass.

    Returns None at the first doubt: `decode_state` then parses it the slow way,
    which names exactly what is wrong.
    """
    validator = _object_validator(type(template), type(template.state))
    if validator is None or (_has_long_digit_run(data) and _has_huge_int(data)):
        return None
    try:
        doc = validator.validate_json(data)
    except (ValidationError, ValueError, RecursionError):
        return None
    meta: _Meta = doc.checkmate
    state: BaseStageState[Any] = doc.state
    fields: dict[str, Any] = doc.__pydantic_extra__ or {}
    name = template.stage_name
    if (
        meta.format != FORMAT_VERSION
        or meta.position != position
        or meta.stage_count != stage_count
        or fields.get("stage_name") != name
        or not _same_class(meta.stage_class, class_path(type(template)))
        or state.task_id != task_id
        or state.stage_name != name
        or state.status is StageStatus.UNBOUND
        or (
            not _same_fields(template, fields) and _check_stage_fields(template, fields) is not None
        )
        or check_history(state) is not None
    ):
        return None
    return state


def decode_state(
    template: BaseStage[Any],
    data: bytes,
    *,
    obj_name: str,
    task_id: str,
    position: int,
    stage_count: int,
) -> BaseStageState[Any]:
    """Parse and validate a stage object against its template; return the state.

    Raises:
        CorruptStateError: The bytes are not valid JSON of the right shape, or
            the state fails validation.
        StateMismatchError: The object belongs to another stage class, position
            or task layout than the template.
    """
    fast = _decode_fast(template, data, task_id, position, stage_count)
    if fast is not None:
        return fast
    # Not a plain, valid object of this stage: find out exactly what is wrong.
    name = template.stage_name
    try:
        doc = parse_json(data)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(obj_name, task_id, name, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise _corrupt(obj_name, task_id, name, "not a JSON object")
    meta = doc.get(META_KEY)
    if not isinstance(meta, dict):
        raise _corrupt(obj_name, task_id, name, f"no {META_KEY!r} member")
    problem = _check_meta(meta) or _check_stage_fields(template, doc)
    if problem is not None:
        raise _corrupt(obj_name, task_id, name, problem)
    if meta.get("format") != FORMAT_VERSION:
        raise _corrupt(
            obj_name,
            task_id,
            name,
            f"unsupported format {meta.get('format')!r} (this version reads {FORMAT_VERSION})",
        )
    if doc.get("stage_name") != name:
        raise _corrupt(
            obj_name, task_id, name, f"it holds stage {doc.get('stage_name')!r}, not {name!r}"
        )
    stored_class = meta.get("stage_class")
    expected_class = class_path(type(template))
    if not isinstance(stored_class, str) or not _same_class(stored_class, expected_class):
        raise StateMismatchError(
            f"stage {name!r} of task {task_id!r} was persisted by class {stored_class!r}, "
            f"but the template is {expected_class!r}; run the task with the stages it was "
            "created with, or use a new task id",
            task_id=task_id,
            stage_name=name,
            obj_name=obj_name,
        )
    if meta.get("position") != position or meta.get("stage_count") != stage_count:
        raise StateMismatchError(
            f"stage {name!r} of task {task_id!r} was persisted as stage "
            f"{meta.get('position')!r} of {meta.get('stage_count')!r}, but the templates put it at "
            f"{position} of {stage_count}; run the task with the stages it was created with, "
            "or use a new task id",
            task_id=task_id,
            stage_name=name,
            obj_name=obj_name,
        )
    raw_state = doc.get("state")
    if not isinstance(raw_state, dict):
        raise _corrupt(obj_name, task_id, name, "no 'state' object")
    try:
        state: BaseStageState[Any] = type(template.state).model_validate(raw_state)
    except (ValidationError, ValueError, TypeError, RecursionError) as exc:
        raise _corrupt(obj_name, task_id, name, f"the state fails validation ({exc})") from exc
    if state.task_id != task_id or state.stage_name != name:
        raise _corrupt(
            obj_name,
            task_id,
            name,
            f"the state belongs to task {state.task_id!r}, stage {state.stage_name!r}",
        )
    if state.status is StageStatus.UNBOUND:
        raise _corrupt(obj_name, task_id, name, "a persisted stage cannot be UNBOUND")
    problem = check_history(state)
    if problem is not None:
        raise _corrupt(obj_name, task_id, name, problem)
    return state
