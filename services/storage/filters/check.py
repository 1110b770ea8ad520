"""Checks a parsed filter against the fields an event has and its payload schemas, and turns it
into typed predicates (what to compare, how, with a value of the right Python type).

Fields: `id`, `key`, `type` (strings), `event_time` (an RFC 3339 timestamp in quotes),
`attributes.<name>` (strings; `attributes:<name>` tests presence), `payload.<path>` (as the
schemas in scope declare, see services.storage.filters.fields).

Operators by type:
- string: = != < <= > >= (code point order), `:` with a glob (`*` matches any run of
  characters, everything else itself; `:` without a `*` is equality), `:*` presence;
- number, integer: = != < <= > >=, `:*`; boolean: = !=, `:*`;
- object: `:*`, `:<name>` (has that field); array: `:*`, `:<value>` (has that element);
- event_time: = != < <= > >=.

`!=` and the ordering comparisons match events that have the field with a value of the field's
type; `NOT r` matches every event in scope that `r` does not (including those without the field).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from services.storage.filters.fields import ITEMS_SUFFIX, FieldScope, JsonType
from services.storage.filters.syntax import (
    And,
    Comparator,
    FilterError,
    Member,
    Node,
    Not,
    Or,
    Restriction,
    Value,
)
from services.storage.times import TimeBound, time_bound
from streammesh.envelope import MAX_SECONDS, MIN_SECONDS

__all__ = [
    "COLUMN_FIELDS",
    "AllOf",
    "AnyOf",
    "Attribute",
    "Column",
    "Compare",
    "Contains",
    "EventTime",
    "Field",
    "Glob",
    "Negation",
    "Order",
    "Payload",
    "Predicate",
    "Present",
    "Scalar",
    "Target",
    "check_filter",
    "instant",
    "refusal",
    "string_restriction",
    "typed_literal",
    "walk",
]

COLUMN_FIELDS = ("id", "key", "type")
"""Envelope strings a filter may name directly."""
_FIELDS_HINT = "id, key, type, event_time, attributes.<name>, payload.<field>"
_MAX_LISTED = 12
_HINT_CANDIDATES = 100
"""Declared fields a did-you-mean hint compares with, at most: each comparison is quadratic in
the names' lengths, and a schema may declare thousands of long, alike names."""
_HINT_CHARS = 64

Scalar = str | Decimal | bool
Order = Literal["=", "!=", "<", "<=", ">", ">="]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    """One of COLUMN_FIELDS."""


@dataclass(frozen=True, slots=True)
class EventTime:
    pass


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str | None
    """None: the attributes map itself (only for presence: any attribute)."""


@dataclass(frozen=True, slots=True)
class Payload:
    path: tuple[str, ...]
    """Empty: the payload itself (only for presence: a JSON payload)."""
    kind: JsonType


@dataclass(frozen=True, slots=True)
class Field:
    """A NOT NULL column of another resource's table (services.storage.filters.resources)."""

    column: str
    kind: Literal["string", "integer", "nanos", "timestamp", "boolean"]
    """nanos: a bigint of nanoseconds since the Unix epoch; timestamp: a timestamptz."""


Target = Column | EventTime | Attribute | Payload | Field


@dataclass(frozen=True, slots=True)
class Compare:
    target: Target
    op: Order
    value: Scalar | TimeBound


@dataclass(frozen=True, slots=True)
class Glob:
    """A string target matching `pattern`, whose `*` matches any run of characters."""

    target: Target
    pattern: str


@dataclass(frozen=True, slots=True)
class Present:
    target: Target


@dataclass(frozen=True, slots=True)
class Contains:
    """An array target with `value` among its elements."""

    target: Payload
    value: Scalar


@dataclass(frozen=True, slots=True)
class AllOf:
    items: tuple[Predicate, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    items: tuple[Predicate, ...]


@dataclass(frozen=True, slots=True)
class Negation:
    item: Predicate


Predicate = Compare | Glob | Present | Contains | AllOf | AnyOf | Negation


def refusal(reason: str, column: int, token: str, detail: str = "") -> FilterError:
    return FilterError(reason, column=column, token=token, detail=detail)


def _listing(paths: list[str]) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    return shown + (", ..." if len(paths) > _MAX_LISTED else "")


def _unknown_payload_field(member: Member, index: int, scope: FieldScope) -> FilterError:
    path = ".".join(member.names[1:])
    declared = scope.declared_paths()
    guess: list[str] = []
    if len(path) <= _HINT_CHARS:
        alike = [p for p in declared if len(p) <= _HINT_CHARS and abs(len(p) - len(path)) <= 8]
        guess = difflib.get_close_matches(path, alike[:_HINT_CANDIDATES], n=1)
    hint = f'did you mean "payload.{guess[0]}"? ' if guess else ""
    names = sorted(scope.schemas)
    if not names:
        where = "no schema in scope declares payload fields; name event types that have one"
    elif len(names) == 1:
        where = f'schema of "{names[0]}" declares: {_listing(declared) or "nothing"}'
    else:
        quoted = ", ".join(f'"{name}"' for name in names[:_MAX_LISTED])
        where = f"schemas of {quoted} declare: {_listing(declared) or 'nothing'}"
    return refusal(
        f'unknown field "payload.{path}"', member.columns[index], member.names[index], hint + where
    )


def _payload_kind(member: Member, scope: FieldScope) -> JsonType | None:
    """The type the scope gives payload.<path>; None for an undeclared field typed by its
    literal (allow_undeclared)."""
    path = ".".join(member.names[1:])
    kinds = scope.declarations(path)
    unified = {"number" if kind == "integer" else kind for kind in kinds.values()}
    if len(unified) > 1:
        conflict = ", ".join(f'"{name}": {kind}' for name, kind in sorted(kinds.items()))
        raise refusal(
            f'field "payload.{path}" has different types in the schemas in scope ({conflict}); '
            "narrow the query to types that agree",
            member.column,
            member.source,
        )
    if kinds:
        return next(iter(kinds.values())) if len(set(kinds.values())) == 1 else "number"
    if scope.allow_undeclared:
        return None
    # Point at the first name that no schema declares as a prefix.
    index = 1
    while index < len(member.names) - 1:
        if not scope.declarations(".".join(member.names[1 : index + 1])):
            break
        index += 1
    raise _unknown_payload_field(member, index, scope)


def _literal_kind(value: Value) -> JsonType:
    if value.kind == "number":
        return "number"
    if value.kind == "text" and value.text in ("true", "false"):
        return "boolean"
    return "string"


def typed_literal(label: str, kind: JsonType, value: Value) -> Scalar:
    """`value` as a `kind` literal, or why not."""
    if value.kind == "any":
        raise refusal(f"{label}: * stands only after `:` (presence)", value.column, value.source)
    if kind == "string":
        if value.kind == "number":
            raise refusal(
                f'{label} is a string; quote the value ("{value.text}")',
                value.column,
                value.source,
            )
        return value.text
    if kind in ("number", "integer"):
        number = _number(value)
        if number is None:
            raise refusal(
                f"{label} is {_a(kind)}; {value.source} is not a number (write 10, -2.5, 1e3 "
                "without quotes)",
                value.column,
                value.source,
            )
        if kind == "integer" and number != number.to_integral_value():
            raise refusal(
                f"{label} is an integer; {value.source} is not", value.column, value.source
            )
        return number
    if kind == "boolean":
        if value.kind != "text" or value.text not in ("true", "false"):
            raise refusal(
                f"{label} is a boolean; write true or false (unquoted)", value.column, value.source
            )
        return value.text == "true"
    raise refusal(f"{label} is {_a(kind)} and has no value to compare", value.column, value.source)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _number(value: Value) -> Decimal | None:
    if value.kind != "number":
        return None
    try:
        number = Decimal(value.text)
    except InvalidOperation:
        return None
    # Postgres numeric keeps 16383 digits after the point: stay well inside that.
    digits = len(number.as_tuple().digits)
    fits = number.is_finite() and abs(number.adjusted()) <= 15_000 and digits <= 1000
    return number if fits else None


_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", re.ASCII)


def instant(value: Value, label: str = "event_time") -> TimeBound:
    example = 'an RFC 3339 timestamp in quotes, such as "2026-01-31T12:00:00Z"'
    if value.kind != "string":
        raise refusal(f"{label} takes {example}", value.column, value.source)
    text = value.text.upper()
    stamp = Timestamp()
    try:
        if not _RFC3339.fullmatch(text):
            raise ValueError(text)
        stamp.FromJsonString(text)
    except ValueError:
        raise refusal(f"{value.source} is not {example}", value.column, value.source) from None
    if not MIN_SECONDS <= stamp.seconds <= MAX_SECONDS:
        raise refusal(f"{value.source} is outside years 1 to 9999", value.column, value.source)
    return time_bound(stamp)


def string_restriction(target: Target, label: str, op: Comparator, value: Value) -> Predicate:
    if op == ":":
        if value.kind == "any":
            return Present(target)
        pattern = typed_literal(label, "string", value)
        assert isinstance(pattern, str)
        return Glob(target, pattern) if "*" in pattern else Compare(target, "=", pattern)
    return Compare(target, op, typed_literal(label, "string", value))


def _restriction(node: Restriction, scope: FieldScope) -> Predicate:
    member, op, value = node.member, node.comparator, node.value
    at_op = node.comparator_column
    label = member.source
    if op is None or value is None:
        raise refusal(
            f"{label} needs a comparison (such as {label} = value, or {label}:* for presence)",
            member.column,
            label,
        )
    head, rest = member.names[0], member.names[1:]
    if head in COLUMN_FIELDS or head == "event_time":
        if rest:
            raise refusal(f'{head} has no field "{rest[0]}"', member.columns[1], rest[0])
        if head == "event_time":
            if op == ":":
                raise refusal("event_time is always set; compare it with = < > ...", at_op, ":")
            return Compare(EventTime(), op, instant(value))
        return string_restriction(Column(head), label, op, value)
    if head == "attributes":
        return _attribute(member, op, value)
    if head == "payload":
        return _payload(member, op, value, scope, at_op)
    raise refusal(f'unknown field "{label}"', member.column, head, f"fields: {_FIELDS_HINT}")


def _attribute(member: Member, op: Comparator, value: Value) -> Predicate:
    names = member.names[1:]
    if len(names) > 1:
        raise refusal(
            "attributes are flat: name one as attributes.<name> (quote a name with dots)",
            member.columns[2],
            names[1],
        )
    if not names:
        if op != ":":
            raise refusal(
                "attributes is a map; compare one attribute (attributes.<name> = value)",
                member.column,
                member.source,
            )
        if value.kind == "any":
            return Present(Attribute(None))
        if value.kind == "number":
            raise refusal("attribute names are strings; quote it", value.column, value.source)
        return Present(Attribute(value.text))
    return string_restriction(Attribute(names[0]), member.source, op, value)


def _has_field(member: Member, value: Value, scope: FieldScope) -> Predicate:
    """`object:name`: the object has the field `name`, which its schema must declare unless it
    declares no fields at all (an open map) or the scope allows undeclared fields."""
    inner = Member(
        (*member.names, value.text),
        (*member.columns, value.column),
        f"{member.source}.{value.source}",
    )
    prefix = ".".join(member.names[1:])
    prefix = f"{prefix}." if prefix else ""
    children = [path for path in scope.declared_paths() if path.startswith(prefix)]
    if member.names[1:] and not children:
        return Present(Payload(inner.names[1:], "object"))
    return _payload(inner, ":", Value("any", "*", value.column, "*"), scope)


def _payload(
    member: Member, op: Comparator, value: Value, scope: FieldScope, at_op: int = 0
) -> Predicate:
    path = member.names[1:]
    label = member.source
    if not path:
        if op != ":":
            raise refusal(
                "payload is an object; compare one of its fields (payload.<field> = value)",
                member.column,
                label,
            )
        if value.kind == "any":
            return Present(Payload((), "object"))
        return _has_field(member, value, scope)
    declared = _payload_kind(member, scope)
    kind: JsonType = declared or _literal_kind(value)
    target = Payload(path, kind)
    if op == ":" and value.kind == "any":
        return Present(target)
    if kind == "object":
        if op != ":":
            raise refusal(
                f"{label} is an object; compare one of its fields ({label}.<field>)",
                member.column,
                label,
            )
        return _has_field(member, value, scope)
    if kind == "array":
        if op != ":":
            raise refusal(
                f"{label} is an array; test an element with {label}:<value>", member.column, label
            )
        items = set(scope.declarations(".".join(path) + ITEMS_SUFFIX).values())
        item_kind = items.pop() if len(items) == 1 else _literal_kind(value)
        return Contains(target, typed_literal(f"an element of {label}", item_kind, value))
    if kind == "string":
        return string_restriction(target, label, op, value)
    if op == ":":
        raise refusal(
            f"{label} is {_a(kind)}; `:` takes only * here (use = to compare)", at_op, ":"
        )
    if kind == "boolean" and op not in ("=", "!="):
        raise refusal(f"{label} is a boolean; compare it with = or !=", at_op, op)
    return Compare(target, op, typed_literal(label, kind, value))


def walk(node: Node, restriction: Callable[[Restriction], Predicate]) -> Predicate:
    """The predicate of a parsed filter, each restriction typed by `restriction` (which
    raises FilterError for one that does not fit)."""
    if isinstance(node, Restriction):
        return restriction(node)
    if isinstance(node, Not):
        return Negation(walk(node.item, restriction))
    items = tuple(walk(item, restriction) for item in node.items)
    if isinstance(node, Or):
        return AnyOf(items)
    assert isinstance(node, And)
    return AllOf(items)


def check_filter(node: Node, scope: FieldScope) -> Predicate:
    """The typed predicate of a parsed filter; FilterError naming the first field, operator or
    literal that does not fit."""
    return walk(node, lambda restriction: _restriction(restriction, scope))
