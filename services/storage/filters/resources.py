"""AIP-160 filters over the engines' outputs (alerts, window results, late events): the same
syntax, operators and error style as QueryEvents (services.storage.filters.check), over a fixed
table of fields per resource instead of an event's envelope and payload schemas.

Field kinds and what they take:
- string: = != < <= > >= (code point order), `:` with a `*` glob, `:*`; with `choices`, only
  those values (matched without regard to case: `source = WINDOW`);
- integer: = != < <= > >= with a number (a version, a revision, a partition);
- time (event times stored as nanoseconds, and record times as timestamptz): = != < <= > >=
  with an RFC 3339 timestamp in quotes, as `event_time` takes;
- boolean: = != with true or false;
- `values.<name>` (window results): an aggregate's value, a number or null: = != < <= > >=
  and `values.<name>:*` (not null).

Every field is NOT NULL, so `field:*` is always true. The SQL is rendered by
services.storage.filters.sql with every value a bound parameter.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from services.storage.filters.check import (
    Compare,
    Field,
    Payload,
    Predicate,
    Present,
    instant,
    refusal,
    string_restriction,
    typed_literal,
    walk,
)
from services.storage.filters.sql import CompiledFilter, EventColumns, render_sql
from services.storage.filters.syntax import FilterError, Restriction, Value, parse_filter
from services.storage.times import unix_micros

__all__ = [
    "ALERT_FIELDS",
    "LATE_EVENT_FIELDS",
    "WINDOW_RESULT_FIELDS",
    "ResourceField",
    "ResourceFields",
    "compile_resource_filter",
]

Kind = Literal["string", "integer", "nanos", "timestamp", "boolean"]
_MIN_BIGINT, _MAX_BIGINT = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class ResourceField:
    column: str
    kind: Kind
    choices: tuple[str, ...] = ()
    """For a string: the only values it holds (lower case)."""


@dataclass(frozen=True)
class ResourceFields:
    """What a filter over one resource may name: field name -> its column, and the jsonb
    column of numeric values that `values.<name>` reads (window results only)."""

    fields: Mapping[str, ResourceField]
    values_column: str | None = None
    hint: str = field(init=False)

    def __post_init__(self) -> None:
        names = sorted(self.fields) + (["values.<name>"] if self.values_column else [])
        object.__setattr__(self, "hint", ", ".join(names))


def _text(column: str, *choices: str) -> ResourceField:
    return ResourceField(column, "string", choices)


ALERT_FIELDS = ResourceFields(
    {
        "alert_id": _text("alert_id"),
        "rule_id": _text("rule_id"),
        "rule_version": ResourceField("rule_version", "integer"),
        "rule_kind": _text("rule_kind", "threshold", "rate", "sequence", "absence"),
        "key": _text("key"),
        "first_event_time": ResourceField("first_event_nanos", "nanos"),
        "last_event_time": ResourceField("last_event_nanos", "nanos"),
        "create_time": ResourceField("created_at", "timestamp"),
    }
)
WINDOW_RESULT_FIELDS = ResourceFields(
    {
        "window_id": _text("window_id"),
        "window_version": ResourceField("window_version", "integer"),
        "partition": ResourceField("partition", "integer"),
        "group": _text("group_key"),
        "key": _text("group_key"),
        "start_time": ResourceField("start_nanos", "nanos"),
        "end_time": ResourceField("end_nanos", "nanos"),
        "revision": ResourceField("revision", "integer"),
        "retracted": ResourceField("retracted", "boolean"),
        "watermark_time": ResourceField("watermark_nanos", "nanos"),
        "emit_time": ResourceField("emitted_at", "timestamp"),
    },
    # Table-qualified: VALUES is a reserved word, allowed as a column label after a dot.
    values_column="window_results.values",
)
LATE_EVENT_FIELDS = ResourceFields(
    {
        "source": _text("source", "rule", "window"),
        "definition_id": _text("definition_id"),
        "definition_version": ResourceField("definition_version", "integer"),
        "event_id": _text("event_id"),
        "event_key": _text("event_key"),
        "key": _text("event_key"),
        "event_time": ResourceField("event_time_nanos", "nanos"),
        "watermark_time": ResourceField("watermark_nanos", "nanos"),
        "window_start_time": ResourceField("window_start_nanos", "nanos"),
        "window_end_time": ResourceField("window_end_nanos", "nanos"),
        "reason": _text("reason"),
        "record_time": ResourceField("recorded_at", "timestamp"),
    }
)


def _values(node: Restriction, table: ResourceFields) -> Predicate:
    member, op, value = node.member, node.comparator, node.value
    assert op is not None and value is not None
    if len(member.names) != 2:
        at = member.columns[2] if len(member.names) > 2 else member.column
        raise refusal(
            "values holds numbers by aggregate name: write values.<name> (quote a name with dots)",
            at,
            member.source,
        )
    target = Payload(member.names[1:], "number")
    if op == ":":
        if value.kind != "any":
            raise refusal(f"{member.source} is a number; test presence with :*", value.column, ":")
        return Present(target)
    return Compare(target, op, typed_literal(member.source, "number", value))


def _choice(spec: ResourceField, label: str, op: str, value: str, column: int) -> str:
    lowered = value.lower()
    if lowered not in spec.choices:
        raise refusal(f"{label} is one of {', '.join(spec.choices)}; not {value!r}", column, value)
    if op not in ("=", "!=", ":"):
        raise refusal(f"{label} is compared with = or !=", column, value)
    return lowered


def _restriction(node: Restriction, table: ResourceFields) -> Predicate:
    member, op, value = node.member, node.comparator, node.value
    label, head = member.source, member.names[0]
    if op is None or value is None:
        raise refusal(f"{label} needs a comparison (such as {label} = value)", member.column, label)
    if head == "values" and table.values_column:
        return _values(node, table)
    spec = table.fields.get(head)
    if spec is None:
        guess = difflib.get_close_matches(head, list(table.fields), n=1)
        hint = f'did you mean "{guess[0]}"? ' if guess else ""
        raise refusal(
            f'unknown field "{label}"', member.column, head, f"{hint}fields: {table.hint}"
        )
    if len(member.names) > 1:
        raise refusal(
            f'{head} has no field "{member.names[1]}"', member.columns[1], member.names[1]
        )
    target = Field(spec.column, spec.kind)
    if op == ":" and value.kind == "any":
        return Present(target)
    if spec.kind == "string":
        if spec.choices and value.kind != "any":
            chosen = _choice(spec, label, op, value.text, value.column)
            value = Value("string", chosen, value.column, value.source)
        return string_restriction(target, label, op, value)
    if op == ":":
        raise refusal(
            f"{label} is always set; compare it with = < > ...", node.comparator_column, ":"
        )
    if spec.kind in ("nanos", "timestamp"):
        bound = instant(value, label)
        if spec.kind == "timestamp":
            return Compare(target, op, bound)
        nanos = unix_micros(bound[0]) * 1000 + bound[1]
        if not _MIN_BIGINT <= nanos <= _MAX_BIGINT:
            # Nanoseconds since the epoch in a bigint span the years 1677 to 2262 only.
            raise refusal(
                f"{value.source} is out of range for {label} (years 1678 to 2261)",
                value.column,
                value.source,
            )
        return Compare(target, op, Decimal(nanos))
    if spec.kind == "boolean" and op not in ("=", "!="):
        raise refusal(f"{label} is a boolean; compare it with = or !=", node.comparator_column, op)
    scalar = typed_literal(label, "boolean" if spec.kind == "boolean" else "integer", value)
    if isinstance(scalar, Decimal) and not _MIN_BIGINT <= scalar <= _MAX_BIGINT:
        raise refusal(f"{value.source} is out of range for {label}", value.column, value.source)
    return Compare(target, op, scalar)


def compile_resource_filter(
    text: str, table: ResourceFields, *, first_param: int = 1, field_name: str = "filter_expression"
) -> CompiledFilter | None:
    """The WHERE expression of an AIP-160 filter over one resource (None for an empty filter),
    its placeholders numbered from `first_param`; FilterError naming the offending token, its
    field violation named `field_name` (the request field the filter came in)."""
    try:
        node = parse_filter(text)
        if node is None:
            return None
        predicate = walk(node, lambda restriction: _restriction(restriction, table))
    except FilterError as error:
        raise FilterError(
            error.reason,
            column=error.column,
            token=error.token,
            detail=error.detail,
            field=field_name,
        ) from None
    columns = EventColumns(payload_json=table.values_column or "payload_json")
    return render_sql(predicate, columns, first_param=first_param)
