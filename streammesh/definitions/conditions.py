"""Conditions of pattern rules: a small language written as data, validated, compiled once.

A condition is one of
- a leaf `{"field": "payload.amount", "op": "gt", "value": 100}`,
- `{"all": [condition, ...]}`, `{"any": [condition, ...]}`, `{"not": condition}`,
- a list `[condition, ...]`, shorthand for `all`.

Fields are the engine's field paths (`key`, `type`, `id`, `event_time`, `payload.<name>...`,
`attributes.<name>`). Operators: `eq`, `ne`, `lt`, `lte`, `gt`, `gte`, `in`, `not_in`,
`exists` (value true or false), `prefix` (strings). Every comparison on a field the event lacks
is false (only `exists: false` holds), so `ne` never matches a missing field, as a SQL
comparison with NULL would not; ordering operators compare numbers with numbers (booleans are
not numbers) and strings with strings, anything else is false rather than an error, so one odd
payload cannot stop a partition.

This is data rather than the AIP-160 text of the query filters because rules are stored and
edited as JSON/YAML documents, and because the engine must not import the storage service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streammesh.definitions.events import (
    MISSING,
    EngineEvent,
    FieldPathError,
    compile_field_path,
)
from streammesh.definitions.rule_errors import RuleError

__all__ = [
    "OPERATORS",
    "AllOf",
    "AnyOf",
    "Condition",
    "EventPredicate",
    "Leaf",
    "Not",
    "compile_condition",
    "parse_condition",
]

EventPredicate = Callable[[EngineEvent], bool]

OPERATORS = ("eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "exists", "prefix")
_ORDERING = {"lt", "lte", "gt", "gte"}


@dataclass(frozen=True, slots=True)
class Leaf:
    """`field op value`."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every part holds (true when empty)."""

    parts: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one part holds (false when empty)."""

    parts: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """The part does not hold."""

    part: Condition


Condition = Leaf | AllOf | AnyOf | Not


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _freeze(value: Any) -> Any:
    """Lists in a condition's value become tuples so the parsed rule is hashable and comparable."""
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def parse_condition(data: Any, where: str) -> Condition:
    """Parse and validate one condition; `where` names it in errors (`rules[0].match.where`)."""
    if isinstance(data, list):
        return AllOf(tuple(parse_condition(item, f"{where}[{i}]") for i, item in enumerate(data)))
    if not isinstance(data, Mapping):
        raise RuleError(where, "must be a condition: {field, op, value}, all, any, not or a list")
    if "all" in data or "any" in data:
        name = "all" if "all" in data else "any"
        _only(data, {name}, where)
        items = data[name]
        if not isinstance(items, list):
            raise RuleError(f"{where}.{name}", "must be a list of conditions")
        parts = tuple(parse_condition(item, f"{where}.{name}[{i}]") for i, item in enumerate(items))
        return AllOf(parts) if name == "all" else AnyOf(parts)
    if "not" in data:
        _only(data, {"not"}, where)
        return Not(parse_condition(data["not"], f"{where}.not"))
    _only(data, {"field", "op", "value"}, where)
    return _parse_leaf(data, where)


def _only(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RuleError(
            f"{where}.{unknown[0]}", f"unknown key (expected {', '.join(sorted(allowed))})"
        )


def _parse_leaf(data: Mapping[str, Any], where: str) -> Leaf:
    path = data.get("field")
    if not isinstance(path, str):
        raise RuleError(f"{where}.field", "must be a field path such as payload.amount")
    try:
        compile_field_path(path)
    except FieldPathError as exc:
        raise RuleError(f"{where}.field", str(exc)) from None
    op = data.get("op")
    if op not in OPERATORS:
        raise RuleError(f"{where}.op", f"must be one of {', '.join(OPERATORS)}")
    if "value" not in data:
        raise RuleError(f"{where}.value", "is required")
    value = data["value"]
    if op == "exists" and not isinstance(value, bool):
        raise RuleError(f"{where}.value", "must be true or false for exists")
    if op in _ORDERING and not (_is_number(value) or isinstance(value, str)):
        raise RuleError(f"{where}.value", f"must be a number or a string for {op}")
    if op == "prefix" and not isinstance(value, str):
        raise RuleError(f"{where}.value", "must be a string for prefix")
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not value:
            raise RuleError(f"{where}.value", f"must be a non-empty list for {op}")
        if any(isinstance(item, list | dict) for item in value):
            raise RuleError(f"{where}.value", f"must list plain values for {op}")
    elif isinstance(value, list | dict):
        raise RuleError(f"{where}.value", f"must be a plain value for {op}")
    return Leaf(path, op, _freeze(value))


def compile_condition(condition: Condition) -> EventPredicate:
    """One Python callable for the whole tree; each leaf resolves its field path once, here."""
    if isinstance(condition, Leaf):
        return _compile_leaf(condition)
    if isinstance(condition, Not):
        inner = compile_condition(condition.part)
        return lambda event: not inner(event)
    parts = [compile_condition(part) for part in condition.parts]
    if isinstance(condition, AllOf):
        if not parts:
            return lambda event: True
        if len(parts) == 1:
            return parts[0]
        return lambda event: all(part(event) for part in parts)
    if not parts:
        return lambda event: False
    return lambda event: any(part(event) for part in parts)


def _compile_leaf(leaf: Leaf) -> EventPredicate:
    get = compile_field_path(leaf.field)
    op, value = leaf.op, leaf.value
    if op == "exists":
        if value:
            return lambda event: get(event) is not MISSING
        return lambda event: get(event) is MISSING
    if op == "eq":
        return _equality(get, value, negate=False)
    if op == "ne":
        return _equality(get, value, negate=True)
    if op in ("in", "not_in"):
        return _membership(get, value, negate=op == "not_in")
    if op == "prefix":
        return lambda event: _has_prefix(get(event), value)
    return _ordering(get, op, value)


def _same_kind(left: Any, right: Any) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1 and "1" is not 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool)
    if _is_number(left):
        return _is_number(right)
    return type(left) is type(right) or (left is None and right is None)


def _equality(get: Callable[[EngineEvent], Any], value: Any, *, negate: bool) -> EventPredicate:
    def predicate(event: EngineEvent) -> bool:
        actual = get(event)
        if actual is MISSING:
            return False
        equal = _same_kind(actual, value) and actual == value
        return equal is not negate

    return predicate


def _membership(
    get: Callable[[EngineEvent], Any], values: Sequence[Any], *, negate: bool
) -> EventPredicate:
    def predicate(event: EngineEvent) -> bool:
        actual = get(event)
        if actual is MISSING or isinstance(actual, list | dict):
            return False
        found = any(_same_kind(actual, item) and actual == item for item in values)
        return found is not negate

    return predicate


def _has_prefix(actual: Any, prefix: str) -> bool:
    return isinstance(actual, str) and actual.startswith(prefix)


def _ordering(get: Callable[[EngineEvent], Any], op: str, value: Any) -> EventPredicate:
    numeric = _is_number(value)

    def comparable(actual: Any) -> bool:
        if numeric:
            return _is_number(actual)
        return isinstance(actual, str)

    if op == "lt":
        return lambda event: comparable(actual := get(event)) and actual < value
    if op == "lte":
        return lambda event: comparable(actual := get(event)) and actual <= value
    if op == "gt":
        return lambda event: comparable(actual := get(event)) and actual > value
    return lambda event: comparable(actual := get(event)) and actual >= value
