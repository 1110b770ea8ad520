"""The engine's view of one event, and compiled accessors for the fields rules and windows name.

Fields are addressed by path, as in the query filter language: `key`, `type`, `id`,
`event_time`, `payload.<name>[.<name>...]` and `attributes.<name>`. A path is compiled once
(when a window or rule is loaded) into a plain function, so the per-event cost is a few dict
lookups and no parsing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MISSING", "EngineEvent", "FieldPathError", "compile_field_path"]


class _Missing:
    """The value of a path the event does not have (distinct from a JSON null)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()
"""Returned by an accessor when the event lacks the field."""


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """One event as the engine sees it. `payload` is the parsed JSON object ({} when the payload
    is not a JSON object); `event_time_nanos` is nanoseconds since the Unix epoch."""

    id: str
    key: str
    type: str
    event_time_nanos: int
    partition: int = 0
    tenant: str = "default"
    payload: Mapping[str, Any] = field(default_factory=dict)
    attributes: Mapping[str, str] = field(default_factory=dict)


class FieldPathError(ValueError):
    """A field path that names nothing an event has; the message names the path."""


_TOP_LEVEL: dict[str, Callable[[EngineEvent], Any]] = {
    "id": lambda event: event.id,
    "key": lambda event: event.key,
    "type": lambda event: event.type,
    "event_time": lambda event: event.event_time_nanos,
    "partition": lambda event: event.partition,
}


def compile_field_path(path: str) -> Callable[[EngineEvent], Any]:
    """An accessor for `path`; it returns MISSING when the event lacks the field."""
    if path in _TOP_LEVEL:
        return _TOP_LEVEL[path]
    root, _, rest = path.partition(".")
    names = rest.split(".") if rest else []
    if root not in ("payload", "attributes") or not names or not all(names):
        raise FieldPathError(
            f"field path {path!r}: expected one of {', '.join(sorted(_TOP_LEVEL))}, "
            "payload.<name>[.<name>...] or attributes.<name>"
        )
    if root == "attributes":
        if len(names) != 1:
            raise FieldPathError(f"field path {path!r}: attributes are flat (attributes.<name>)")
        name = names[0]
        return lambda event: event.attributes.get(name, MISSING)
    if len(names) == 1:
        only = names[0]
        return lambda event: event.payload.get(only, MISSING)

    def nested(event: EngineEvent) -> Any:
        value: Any = event.payload
        for name in names:
            if not isinstance(value, Mapping):
                return MISSING
            value = value.get(name, MISSING)
            if value is MISSING:
                return MISSING
        return value

    return nested
