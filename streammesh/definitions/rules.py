"""Pattern rules as data: frozen dataclasses parsed from the JSON/YAML form, with errors naming the
bad part.

The document of one rule (YAML shown; JSON is the same tree):

    id: hot-sensor            # stable across versions; unique within the tenant
    version: 3                # a change is a new version; versions are immutable
    tenant: acme              # the rule sees only this tenant's events
    enabled: true             # false: the rule stops at `activation` and drops its partial state
    activation: "2026-12-01T12:00:00Z"   # event time (ISO 8601 with offset, or integer nanoseconds)
    key: key                  # what matches are grouped by: key (default) or a payload field path
    kind: threshold           # threshold | rate | sequence | absence, with the fields below

    # threshold: a numeric field beyond a value, `count` times (default 1) within `within` (optional)
    match: {type: reading, where: [{field: payload.unit, op: eq, value: C}]}
    field: payload.celsius
    op: gt                    # gt | gte | lt | lte
    value: 80
    mode: crossing            # crossing: from not-beyond (or first seen) to beyond; level: every beyond event
    # rate: at least `count` matching events within `within`:  match, count, within
    # sequence: steps: [pattern, ...] (two or more), within, contiguity: relaxed | strict, scope: pattern
    # absence: first: pattern, absent: pattern, within

A pattern is `{type: name | [names], where: condition}` (both optional); conditions are described in
`conditions.py`. Durations are strings like "250ms", "30s", "5m", "2h", "1d".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from streammesh.definitions.conditions import Condition, parse_condition
from streammesh.definitions.events import FieldPathError, compile_field_path
from streammesh.definitions.rule_errors import RuleError

__all__ = [
    "KINDS",
    "AbsenceSpec",
    "EventPattern",
    "RateSpec",
    "Rule",
    "SequenceSpec",
    "Spec",
    "ThresholdSpec",
    "parse_duration",
    "parse_rule",
    "parse_rules",
]

KINDS = ("threshold", "rate", "sequence", "absence")
_COMMON = {"id", "version", "tenant", "enabled", "activation", "key", "kind", "name"}
_KIND_KEYS = {
    "threshold": {"match", "field", "op", "value", "mode", "count", "within"},
    "rate": {"match", "count", "within"},
    "sequence": {"steps", "within", "contiguity", "scope"},
    "absence": {"first", "absent", "within"},
}
_DURATION = re.compile(r"^([1-9][0-9]*)(ns|us|ms|s|m|h|d)$")
_UNIT_NANOS = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class EventPattern:
    """Which events a step (or a rule) looks at: `types` None means any type."""

    types: frozenset[str] | None = None
    where: Condition | None = None


@dataclass(frozen=True, slots=True)
class ThresholdSpec:
    match: EventPattern
    field: str
    op: str
    value: float
    mode: str
    count: int
    within_nanos: int | None


@dataclass(frozen=True, slots=True)
class RateSpec:
    match: EventPattern
    count: int
    within_nanos: int


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    steps: tuple[EventPattern, ...]
    within_nanos: int
    contiguity: str
    scope: EventPattern
    """The events of a key that strict contiguity looks at: no event in scope may come between
    two steps. Default: any event of the key (in the rule's tenant)."""


@dataclass(frozen=True, slots=True)
class AbsenceSpec:
    first: EventPattern
    absent: EventPattern
    within_nanos: int


Spec = ThresholdSpec | RateSpec | SequenceSpec | AbsenceSpec


@dataclass(frozen=True, slots=True)
class Rule:
    """One version of one rule. Two Rules are equal when their definitions are (the source
    document's spelling, e.g. "60s" against "1m", does not count)."""

    id: str
    version: int
    tenant: str
    enabled: bool
    activation_nanos: int
    key_field: str
    kind: str
    spec: Spec
    name: str = ""
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The document the rule was parsed from (kept for snapshots and for the rule service)."""

    @property
    def ref(self) -> tuple[str, str, int]:
        """(tenant, id, version): a rule version's identity."""
        return (self.tenant, self.id, self.version)


def parse_duration(value: Any, where: str) -> int:
    """Nanoseconds of a duration string like "30s"."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise RuleError(where, 'must be a duration like "30s" (units ns, us, ms, s, m, h, d)')
    return int(match.group(1)) * _UNIT_NANOS[match.group(2)]


def _parse_activation(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return ((moment - _EPOCH) // timedelta(microseconds=1)) * 1_000
    raise RuleError(where, "must be an ISO 8601 time with an offset or integer nanoseconds")


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RuleError(where, "must be a positive integer")
    return value


def _pattern(data: Any, where: str) -> EventPattern:
    if not isinstance(data, Mapping):
        raise RuleError(where, "must be a pattern: {type: name or [names], where: condition}")
    unknown = sorted(set(data) - {"type", "where"})
    if unknown:
        raise RuleError(f"{where}.{unknown[0]}", "unknown key (expected type, where)")
    types: frozenset[str] | None = None
    if "type" in data:
        raw = data["type"]
        names = [raw] if isinstance(raw, str) else raw
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise RuleError(f"{where}.type", "must be an event type or a non-empty list of them")
        types = frozenset(names)
    condition = parse_condition(data["where"], f"{where}.where") if "where" in data else None
    return EventPattern(types, condition)


def _required(data: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in data:
        raise RuleError(f"{where}.{name}", "is required")
    return data[name]


def _spec(kind: str, data: Mapping[str, Any], where: str) -> Spec:
    if kind == "threshold":
        op = data.get("op")
        if op not in ("gt", "gte", "lt", "lte"):
            raise RuleError(f"{where}.op", "must be one of gt, gte, lt, lte")
        value = _required(data, "value", where)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise RuleError(f"{where}.value", "must be a number")
        path = _required(data, "field", where)
        try:
            compile_field_path(path if isinstance(path, str) else "")
        except FieldPathError as exc:
            raise RuleError(f"{where}.field", str(exc)) from None
        mode = data.get("mode", "crossing")
        if mode not in ("crossing", "level"):
            raise RuleError(f"{where}.mode", "must be crossing or level")
        within = data.get("within")
        return ThresholdSpec(
            match=_pattern(data.get("match", {}), f"{where}.match"),
            field=path,
            op=op,
            value=value,
            mode=mode,
            count=_positive_int(data.get("count", 1), f"{where}.count"),
            within_nanos=None if within is None else parse_duration(within, f"{where}.within"),
        )
    if kind == "rate":
        return RateSpec(
            match=_pattern(data.get("match", {}), f"{where}.match"),
            count=_positive_int(_required(data, "count", where), f"{where}.count"),
            within_nanos=parse_duration(_required(data, "within", where), f"{where}.within"),
        )
    within_nanos = parse_duration(_required(data, "within", where), f"{where}.within")
    if kind == "sequence":
        steps = _required(data, "steps", where)
        if not isinstance(steps, list) or len(steps) < 2:
            raise RuleError(f"{where}.steps", "must be a list of two or more patterns")
        contiguity = data.get("contiguity", "relaxed")
        if contiguity not in ("relaxed", "strict"):
            raise RuleError(f"{where}.contiguity", "must be relaxed or strict")
        return SequenceSpec(
            steps=tuple(_pattern(step, f"{where}.steps[{i}]") for i, step in enumerate(steps)),
            within_nanos=within_nanos,
            contiguity=contiguity,
            scope=_pattern(data.get("scope", {}), f"{where}.scope"),
        )
    return AbsenceSpec(
        first=_pattern(_required(data, "first", where), f"{where}.first"),
        absent=_pattern(_required(data, "absent", where), f"{where}.absent"),
        within_nanos=within_nanos,
    )


def parse_rule(data: Any, where: str = "rule") -> Rule:
    """Validate one rule document; a RuleError names the first bad part."""
    if not isinstance(data, Mapping):
        raise RuleError(where, "must be a mapping")
    try:
        # A private deep copy in JSON terms: what is kept is what a snapshot can hold, and a
        # caller changing its document later changes nothing here.
        data = orjson.loads(orjson.dumps(data))
    except orjson.JSONEncodeError:
        raise RuleError(
            where, "must be JSON data (mappings with string keys, lists, strings, numbers)"
        ) from None
    kind = data.get("kind")
    if kind not in KINDS:
        raise RuleError(f"{where}.kind", f"must be one of {', '.join(KINDS)}")
    unknown = sorted(set(data) - _COMMON - _KIND_KEYS[kind])
    if unknown:
        raise RuleError(f"{where}.{unknown[0]}", f"unknown key for a {kind} rule")
    rule_id = _required(data, "id", where)
    if not isinstance(rule_id, str) or not _ID.match(rule_id):
        raise RuleError(f"{where}.id", "must be 1-128 letters, digits, '.', '_', ':' or '-'")
    tenant = data.get("tenant", "default")
    if not isinstance(tenant, str) or not tenant:
        raise RuleError(f"{where}.tenant", "must be a non-empty string")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleError(f"{where}.enabled", "must be true or false")
    key_field = data.get("key", "key")
    try:
        compile_field_path(key_field if isinstance(key_field, str) else "")
    except FieldPathError as exc:
        raise RuleError(f"{where}.key", str(exc)) from None
    name = data.get("name", "")
    if not isinstance(name, str):
        raise RuleError(f"{where}.name", "must be a string")
    return Rule(
        id=rule_id,
        version=_positive_int(_required(data, "version", where), f"{where}.version"),
        tenant=tenant,
        enabled=enabled,
        activation_nanos=_parse_activation(data.get("activation", 0), f"{where}.activation"),
        key_field=key_field,
        kind=kind,
        spec=_spec(kind, data, where),
        name=name,
        source=dict(data),
    )


def parse_rules(data: Any, where: str = "rules") -> tuple[Rule, ...]:
    """Validate a list of rule documents (`rules[2].within: ...` on error)."""
    if not isinstance(data, list):
        raise RuleError(where, "must be a list of rules")
    return tuple(parse_rule(item, f"{where}[{i}]") for i, item in enumerate(data))
