"""Task ids, stage names and the storage object names built from them.

Object names are relative to a `TaskIO` root and always use ``/``. Every name
built here stays inside its task's prefix and within file-name limits on every
backend (at most 255 bytes per path component, no characters that Windows,
S3, GCS or Azure treat specially, no case-only collisions).
"""

from __future__ import annotations

import hashlib
import re
import uuid

from ._memo import BoundedMemo
from .errors import ConfigurationError
from .models import STAGE_NAME_MAX_LENGTH

__all__ = [
    "cancel_obj_name",
    "STAGE_SUFFIX",
    "TASK_ID_MAX_LENGTH",
    "check_obj_name",
    "check_stage_name",
    "check_task_id",
    "lock_obj_name",
    "new_task_id",
    "stage_file_stem",
    "stage_obj_name",
    "task_prefix",
]

TASK_ID_MAX_LENGTH = 128
STAGE_SUFFIX = ".json"
# No stage object name can start with this: plain stems have no "~", and a
# hashed stem has only hex digits after its "~".
_LOCK_NAME = "task~lock"
_CANCEL_NAME = "cancel~request"

_TASK_ID_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")
# Stage names made only of these characters are used as they are in object names.
_PLAIN_STAGE_RE = re.compile(r"[a-z0-9_\-][a-z0-9._\-]*")
_UNSAFE_CHAR_RE = re.compile(r"[^A-Za-z0-9._\-]")
_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
)
_SLUG_MAX = 96
_HASH_CHARS = 16


def new_task_id() -> str:
    """Return a fresh random task id (uuid4 hex)."""
    return uuid.uuid4().hex


def check_task_id(task_id: object) -> str:
    """Return ``task_id`` if it is a safe single path component, else raise.

    Raises:
        ConfigurationError: The id is not a string of 1-128 letters, digits,
            ``.``, ``_`` or ``-`` that does not start with ``.``.
    """
    if not isinstance(task_id, str):
        raise ConfigurationError(f"task_id must be a string or None, not {type(task_id).__name__}")
    if not 0 < len(task_id) <= TASK_ID_MAX_LENGTH or not _TASK_ID_RE.fullmatch(task_id):
        raise ConfigurationError(
            f"invalid task_id {task_id!r}: use 1 to {TASK_ID_MAX_LENGTH} letters, digits, "
            "'.', '_' or '-', not starting with '.' (pass task_id=None to generate one)",
            task_id=task_id if isinstance(task_id, str) else None,
        )
    return task_id


def check_stage_name(name: str) -> str:
    """Return ``name`` if it is a valid stage name, else raise ValueError.

    A stage name has 1 to 150 characters, contains no ``/``, ``\\`` or NUL,
    and is not ``.`` or ``..``.
    """
    if not 0 < len(name) <= STAGE_NAME_MAX_LENGTH:
        raise ValueError(f"a stage name must have 1 to {STAGE_NAME_MAX_LENGTH} characters")
    if "/" in name or "\\" in name or "\x00" in name:
        raise ValueError("a stage name must not contain '/', '\\' or NUL")
    if name in {".", ".."}:
        raise ValueError("a stage name must not be '.' or '..'")
    return name


def stage_file_stem(stage_name: str) -> str:
    """Return the file-name stem used for a stage's object.

    Plain lowercase names (letters, digits, ``.``, ``_``, ``-``) are used as they
    are. Any other name becomes a readable ASCII slug plus ``~`` and a hash of
    the exact name, so distinct names never collide, not even on a
    case-insensitive file system, and no name exceeds 255 bytes.
    """
    stem = _STEMS.get(stage_name)
    if stem is None:
        stem = _file_stem(stage_name)
        if len(_STEMS) < _MAX_STEMS:
            _STEMS[stage_name] = stem
    return stem


# Stage names and their stems (every engine names its stages' objects).
_STEMS: dict[str, str] = {}
_MAX_STEMS = 4096


def _file_stem(stage_name: str) -> str:
    if (
        _PLAIN_STAGE_RE.fullmatch(stage_name)
        and not stage_name.endswith(".")
        and not _is_device_name(stage_name)
    ):
        return stage_name
    slug = _UNSAFE_CHAR_RE.sub("_", stage_name).lstrip(".")[:_SLUG_MAX].rstrip(".")
    if _is_device_name(slug):
        slug = "_" + slug
    digest = hashlib.sha256(stage_name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{slug}~{digest[:_HASH_CHARS]}"


def _is_device_name(stem: str) -> bool:
    """Tell whether Windows would read the name as a device (``con``, ``nul.txt``, ...)."""
    return stem.split(".", maxsplit=1)[0].rstrip(" ").lower() in _WINDOWS_RESERVED


def task_prefix(task_id: str) -> str:
    """Return the prefix (ending in ``/``) under which all of a task's objects live."""
    return f"{task_id}/"


def stage_obj_name(task_id: str, stage_name: str) -> str:
    """Return the object name of a stage's persisted state."""
    return f"{task_id}/{stage_file_stem(stage_name)}{STAGE_SUFFIX}"


def lock_obj_name(task_id: str) -> str:
    """Return the object name of a task's lock (``<task_id>/task~lock``).

    No stage object's name starts with it, so every object whose name does
    belongs to the lock.
    """
    return f"{task_id}/{_LOCK_NAME}"


def cancel_obj_name(task_id: str) -> str:
    """Return the object name of a task's cancellation request (``<task_id>/cancel~request``)."""
    return f"{task_id}/{_CANCEL_NAME}"


def check_obj_name(obj_name: str) -> str:
    """Return ``obj_name`` if it is a safe relative object name, else raise.

    Raises:
        ConfigurationError: The name is empty, absolute, contains a backslash,
            NUL, or an empty, ``.`` or ``..`` path component.
    """
    if type(obj_name) is str:  # a task's names come back with every storage call
        return _CHECKED_NAMES[obj_name]
    return _check_obj_name(obj_name)


def _check_obj_name(obj_name: str) -> str:
    if not isinstance(obj_name, str) or not obj_name:
        raise ConfigurationError(f"invalid object name {obj_name!r}", obj_name=None)
    parts = obj_name.split("/")
    if "\\" in obj_name or "\x00" in obj_name or any(part in {"", ".", ".."} for part in parts):
        raise ConfigurationError(
            f"invalid object name {obj_name!r}: it must be a relative '/'-separated name "
            "with no empty, '.' or '..' component, backslash or NUL",
            obj_name=obj_name,
        )
    return obj_name


_CHECKED_NAMES: BoundedMemo[str, str] = BoundedMemo(_check_obj_name, 8192)
