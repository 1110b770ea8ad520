"""Window definitions as data, and the window range arithmetic.

A definition is a frozen dataclass built from a plain dict (JSON or YAML), so definitions can be
stored, versioned and changed at runtime; a bad one is refused with a `WindowDefError` whose
message names the bad part (`windows[0].size: must be > 0`). Example:

    {"id": "orders-per-minute", "version": 1, "tenant": "acme", "event_type": "order.created",
     "kind": "hopping", "size": "1m", "step": "10s", "allowed_lateness": "30s",
     "group_by": "payload.region",
     "aggregates": [{"name": "orders", "fn": "count"},
                    {"name": "p99_amount", "fn": "p99", "field": "payload.amount"}]}

Durations are strings with a unit (`ns`, `us`, `ms`, `s`, `m`, `h`, `d`). Windows are aligned
to the Unix epoch; a window covers [start, end) in event time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streammesh.definitions.events import FieldPathError, compile_field_path

__all__ = [
    "AGGREGATE_FUNCTIONS",
    "AggregateDef",
    "WindowDef",
    "WindowDefError",
    "parse_duration",
    "parse_window_def",
    "parse_window_defs",
    "window_starts",
]

AGGREGATE_FUNCTIONS = ("count", "sum", "min", "max", "mean", "distinct", "p50", "p95", "p99")
WINDOW_KINDS = ("tumbling", "hopping", "session")
_UNIT_NANOS = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}
_DURATION = re.compile(r"^\s*(\d+)\s*(ns|us|ms|s|m|h|d)\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class WindowDefError(ValueError):
    """A window definition that cannot be used; the message starts with the bad part's path."""


def window_starts(event_time_nanos: int, size_nanos: int, step_nanos: int) -> range:
    """The starts of every window [start, start + size) that contains the event time, earliest
    first, for windows aligned to multiples of `step` (tumbling: step == size, one window).
    The only place the engine does window range arithmetic."""
    last = event_time_nanos - event_time_nanos % step_nanos
    first = (event_time_nanos - size_nanos) // step_nanos * step_nanos + step_nanos
    return range(first, last + 1, step_nanos)


@dataclass(frozen=True, slots=True)
class AggregateDef:
    """One output value of a window: `fn` over the payload field `field` (none for count)."""

    name: str
    fn: str
    field: str | None = None


@dataclass(frozen=True, slots=True)
class WindowDef:
    """A window over the events of one tenant and type, grouped by `group_by`."""

    id: str
    version: int
    tenant: str
    event_type: str
    kind: str
    """`tumbling` (size), `hopping` (size and step) or `session` (gap)."""
    size_nanos: int
    """Window length (tumbling, hopping); 0 for sessions."""
    step_nanos: int
    """Distance between window starts (hopping; equal to size for tumbling); 0 for sessions."""
    gap_nanos: int
    """Inactivity that ends a session; 0 for the other kinds."""
    allowed_lateness_nanos: int
    """How long after a window's end (in watermark time) late events still revise it."""
    group_by: str
    """`key` or a field path (`payload.region`); events without the field are not counted."""
    aggregates: tuple[AggregateDef, ...]

    @property
    def identity(self) -> str:
        """`id@version`, how results and snapshots refer to this definition."""
        return f"{self.id}@{self.version}"


def parse_duration(value: Any, path: str) -> int:
    """Nanoseconds from a string such as `10s` or `250ms`."""
    if not isinstance(value, str):
        raise WindowDefError(f"{path}: expected a duration string such as '10s'")
    match = _DURATION.match(value)
    if match is None:
        raise WindowDefError(
            f"{path}: {value!r} is not a duration (a whole number and one of "
            f"{', '.join(_UNIT_NANOS)})"
        )
    return int(match.group(1)) * _UNIT_NANOS[match.group(2)]


def _text(raw: Mapping[str, Any], name: str, path: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value.strip():
        raise WindowDefError(f"{path}.{name}: required, a non-empty string")
    return value


def _field_path(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise WindowDefError(f"{path}: required, a field path such as 'payload.amount'")
    try:
        compile_field_path(value)
    except FieldPathError as error:
        raise WindowDefError(f"{path}: {error}") from None
    return value


def _aggregate(raw: Any, path: str) -> AggregateDef:
    if not isinstance(raw, Mapping):
        raise WindowDefError(f"{path}: expected an object with name, fn and field")
    name = _text(raw, "name", path)
    if not _NAME.match(name):
        raise WindowDefError(f"{path}.name: {name!r} is not a name (letters, digits, _)")
    fn = raw.get("fn")
    if fn not in AGGREGATE_FUNCTIONS:
        raise WindowDefError(f"{path}.fn: expected one of {', '.join(AGGREGATE_FUNCTIONS)}")
    if fn == "count":
        if raw.get("field") is not None:
            raise WindowDefError(f"{path}.field: count takes no field")
        return AggregateDef(name, fn)
    return AggregateDef(name, fn, _field_path(raw.get("field"), f"{path}.field"))


def _positive(raw: Mapping[str, Any], name: str, path: str) -> int:
    nanos = parse_duration(raw.get(name), f"{path}.{name}")
    if nanos <= 0:
        raise WindowDefError(f"{path}.{name}: must be > 0")
    return nanos


def parse_window_def(raw: Any, path: str = "window") -> WindowDef:
    """One definition from a dict; errors name the part under `path`."""
    if not isinstance(raw, Mapping):
        raise WindowDefError(f"{path}: expected an object")
    known = {"id", "version", "tenant", "event_type", "kind", "size", "step", "gap"}
    known |= {"allowed_lateness", "group_by", "aggregates"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise WindowDefError(f"{path}.{unknown[0]}: unknown field")
    version = raw.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WindowDefError(f"{path}.version: must be an integer >= 1")
    kind = raw.get("kind")
    if kind not in WINDOW_KINDS:
        raise WindowDefError(f"{path}.kind: expected one of {', '.join(WINDOW_KINDS)}")
    size = step = gap = 0
    if kind == "session":
        gap = _positive(raw, "gap", path)
        for name in ("size", "step"):
            if name in raw:
                raise WindowDefError(f"{path}.{name}: a session window has a gap, not a {name}")
    else:
        size = _positive(raw, "size", path)
        step = size
        if kind == "hopping":
            step = _positive(raw, "step", path)
            if step > size:
                raise WindowDefError(f"{path}.step: must be <= size (windows would leave gaps)")
        elif "step" in raw:
            raise WindowDefError(f"{path}.step: a tumbling window has no step (use hopping)")
        if "gap" in raw:
            raise WindowDefError(f"{path}.gap: only session windows have a gap")
    lateness = 0
    if raw.get("allowed_lateness") is not None:
        lateness = parse_duration(raw["allowed_lateness"], f"{path}.allowed_lateness")
    group_by = raw.get("group_by", "key")
    group_by = "key" if group_by == "key" else _field_path(group_by, f"{path}.group_by")
    aggregates_raw = raw.get("aggregates")
    if not isinstance(aggregates_raw, Sequence) or isinstance(aggregates_raw, str):
        raise WindowDefError(f"{path}.aggregates: required, a list")
    if not aggregates_raw:
        raise WindowDefError(f"{path}.aggregates: at least one aggregate")
    aggregates = tuple(
        _aggregate(item, f"{path}.aggregates[{index}]") for index, item in enumerate(aggregates_raw)
    )
    names = [aggregate.name for aggregate in aggregates]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise WindowDefError(f"{path}.aggregates[{index}].name: {name!r} is used twice")
    return WindowDef(
        id=_text(raw, "id", path),
        version=version,
        tenant=_text(raw, "tenant", path),
        event_type=_text(raw, "event_type", path),
        kind=kind,
        size_nanos=size,
        step_nanos=step,
        gap_nanos=gap,
        allowed_lateness_nanos=lateness,
        group_by=group_by,
        aggregates=aggregates,
    )


def parse_window_defs(raw: Any) -> tuple[WindowDef, ...]:
    """Definitions from `{"windows": [...]}` or a bare list; one (id, version) once only."""
    items = raw.get("windows") if isinstance(raw, Mapping) else raw
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise WindowDefError("windows: expected a list of window definitions")
    defs = tuple(parse_window_def(item, f"windows[{index}]") for index, item in enumerate(items))
    seen: set[str] = set()
    for index, definition in enumerate(defs):
        if definition.identity in seen:
            raise WindowDefError(f"windows[{index}].id: {definition.identity} is defined twice")
        seen.add(definition.identity)
    return defs
