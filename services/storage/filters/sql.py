"""Typed filter predicates as one Postgres 15 boolean expression over the events table, with every
value a bound parameter ($n) and every column name from `EventColumns` (checked identifiers).
Payload paths travel as text[] parameters of `#>`/`#>>`, values as jsonb, text, numeric,
boolean or (timestamptz, int2) parameters; the SQL text depends only on the filter's shape.

Index use (what each form can use; the events table's migrations decide what exists):
- `id|key|type = "x"`, ordering: btree on the column ((key, seq), (type, seq) exist);
- `type:"order.*"` (one trailing `*`): `type ^@ $n`, which Postgres 15 turns into a btree range
  on a COLLATE "C" column (with a custom plan, where $n is known); other globs are `LIKE`;
- `event_time` comparisons: the btree on event_time (the row comparison with event_time_nanos
  uses its first column);
- `payload.a.b = v`, `payload.tags:v` (array element): `payload_json @> $n::jsonb`, a GIN index
  `USING gin (payload_json jsonb_path_ops)`; `attributes.k = v`: `attributes @> $n::jsonb`, a GIN
  index on attributes (jsonb_path_ops, or the default jsonb_ops if `attributes:k` presence,
  `attributes ? $n`, should use it too);
- `!=`, ordering and globs on payload/attribute values, presence on payload: no index (the path
  is a parameter, so no expression index can match); they filter what the key, type, time and
  containment conditions select.

Three-valued logic: a comparison whose field is missing yields NULL (no match); NOT is rendered
as `(x) IS NOT TRUE` so that it matches exactly the events `x` does not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from decimal import Decimal

from services.storage.filters.check import (
    AllOf,
    AnyOf,
    Attribute,
    Column,
    Compare,
    Contains,
    EventTime,
    Field,
    Glob,
    Negation,
    Payload,
    Predicate,
    Present,
    Scalar,
    Target,
)
from services.storage.filters.fields import JsonType

__all__ = ["CompiledFilter", "EventColumns", "render_sql"]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}(\.[a-z_][a-z0-9_]{0,62})?", re.ASCII)
_SQL_OP = {"=": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_SQL_TYPE: dict[JsonType, str] = {
    "string": "text",
    "number": "numeric",
    "integer": "numeric",
    "boolean": "boolean",
}
_JSONB_TYPE: dict[JsonType, str] = {"string": "string", "integer": "number", "number": "number"}


@dataclass(frozen=True)
class EventColumns:
    """Column names of the events table (plain or table-qualified lower-case identifiers)."""

    id: str = "id"
    key: str = "key"
    type: str = "type"
    event_time: str = "event_time"
    event_time_nanos: str = "event_time_nanos"
    """The nanoseconds below event_time's microsecond (services.storage.times)."""
    attributes: str = "attributes"
    payload_json: str = "payload_json"
    """The jsonb column holding a JSON payload (NULL for other content types)."""

    def __post_init__(self) -> None:
        for column in fields(self):
            if not _IDENTIFIER.fullmatch(getattr(self, column.name)):
                raise ValueError(f"{column.name}: not a plain column name")


@dataclass(frozen=True)
class CompiledFilter:
    """`sql` is a boolean expression for a WHERE clause; `params` bind its $first.. placeholders
    in order (timestamptz parameters as Postgres microsecond counts: use_integer_timestamps)."""

    sql: str
    params: tuple[object, ...]


def _json_scalar(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return str(value)  # a JSON number: -1.5, 1E+3
    return json.dumps(value, ensure_ascii=False)


def _nested(path: tuple[str, ...], leaf: str) -> str:
    """The JSON text of {path[0]: {path[1]: ... leaf}} (leaf already JSON)."""
    for name in reversed(path):
        leaf = f"{{{json.dumps(name, ensure_ascii=False)}:{leaf}}}"
    return leaf


def _like_pattern(glob: str) -> str:
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


class _Renderer:
    def __init__(self, columns: EventColumns, first_param: int) -> None:
        self._columns = columns
        self._first = first_param
        self.params: list[object] = []

    def bind(self, value: object, sql_type: str) -> str:
        self.params.append(value)
        return f"${self._first + len(self.params) - 1}::{sql_type}"

    def render(self, predicate: Predicate) -> str:
        if isinstance(predicate, AllOf | AnyOf):
            joiner = " AND " if isinstance(predicate, AllOf) else " OR "
            return "(" + joiner.join(self.render(item) for item in predicate.items) + ")"
        if isinstance(predicate, Negation):
            return f"({self.render(predicate.item)}) IS NOT TRUE"
        if isinstance(predicate, Present):
            return self._present(predicate.target)
        if isinstance(predicate, Contains):
            leaf = "[" + _json_scalar(predicate.value) + "]"
            document = _nested(predicate.target.path, leaf)
            return f"{self._columns.payload_json} @> {self.bind(document, 'jsonb')}"
        if isinstance(predicate, Glob):
            return self._glob(predicate)
        return self._compare(predicate)

    def _present(self, target: Target) -> str:
        cols = self._columns
        if isinstance(target, Column | EventTime | Field):
            return "TRUE"  # NOT NULL columns
        if isinstance(target, Attribute):
            if target.name is None:
                return f"{cols.attributes} <> '{{}}'::jsonb"
            return f"{cols.attributes} ? {self.bind(target.name, 'text')}"
        if not target.path:
            return f"{cols.payload_json} IS NOT NULL"
        path = self.bind(list(target.path), "text[]")
        return f"jsonb_typeof({cols.payload_json} #> {path}) <> 'null'"

    def _text(self, target: Target) -> tuple[str, str | None]:
        """A text expression of a string target, and the jsonb-type guard it needs (or None)."""
        cols = self._columns
        if isinstance(target, Column):
            return getattr(cols, target.name), None
        if isinstance(target, Field):
            return target.column, None
        if isinstance(target, Attribute):
            return f"({cols.attributes} ->> {self.bind(target.name, 'text')})", None
        assert isinstance(target, Payload)
        path = self.bind(list(target.path), "text[]")
        guard = f"jsonb_typeof({cols.payload_json} #> {path}) = 'string'"
        return f"({cols.payload_json} #>> {path})", guard

    def _glob(self, predicate: Glob) -> str:
        text, guard = self._text(predicate.target)
        pattern = predicate.pattern
        if pattern.endswith("*") and "*" not in pattern[:-1]:
            # A prefix: `^@` lets Postgres 15 scan a btree range on a COLLATE "C" column.
            test = f"{text} ^@ {self.bind(pattern[:-1], 'text')}"
        else:
            test = f"{text} LIKE {self.bind(_like_pattern(pattern), 'text')}"
        return f"CASE WHEN {guard} THEN {test} END" if guard else test

    def _compare(self, predicate: Compare) -> str:
        cols, target, op = self._columns, predicate.target, _SQL_OP[predicate.op]
        value = predicate.value
        if isinstance(target, EventTime):
            assert isinstance(value, tuple)
            micros, nanos = self.bind(value[0], "timestamptz"), self.bind(value[1], "int2")
            if op == "=":
                return f"({cols.event_time} = {micros} AND {cols.event_time_nanos} = {nanos})"
            return f"({cols.event_time}, {cols.event_time_nanos}) {op} ({micros}, {nanos})"
        if isinstance(target, Field) and target.kind != "string":
            return self._field(target, op, value)
        assert not isinstance(value, tuple)
        if op == "=" and isinstance(target, Attribute | Payload):
            # Containment: the one equality form a GIN index on the jsonb column answers.
            names: tuple[str, ...]
            if isinstance(target, Attribute):
                assert target.name is not None
                column, names = cols.attributes, (target.name,)
            else:
                column, names = cols.payload_json, target.path
            document = _nested(names, _json_scalar(value))
            return f"{column} @> {self.bind(document, 'jsonb')}"
        if isinstance(target, Payload) and target.kind != "string":
            path = self.bind(list(target.path), "text[]")
            element = f"{cols.payload_json} #> {path}"
            typed = f"({element})::{_SQL_TYPE[target.kind]}"
            bound = self.bind(value, _SQL_TYPE[target.kind])
            jsonb_type = _JSONB_TYPE.get(target.kind, target.kind)
            return (
                f"CASE WHEN jsonb_typeof({element}) = '{jsonb_type}' THEN {typed} {op} {bound} END"
            )
        text, guard = self._text(target)
        # Code point order, as the C-collated id, key and type columns compare already (and
        # their btree indexes are in that order, so they keep their own collation).
        ordering = op not in ("=", "<>") and not isinstance(target, Column)
        collated = f'{text} COLLATE "C"' if ordering else text
        test = f"{collated} {op} {self.bind(value, 'text')}"
        return f"CASE WHEN {guard} THEN {test} END" if guard else test

    def _field(self, target: Field, op: str, value: Scalar | tuple[int, int]) -> str:
        """A typed column of a resource table; its btree indexes answer these forms."""
        if target.kind == "timestamp":
            # A timestamptz holds microseconds: compare as (column, 0 ns) with the bound.
            assert isinstance(value, tuple)
            micros, nanos = self.bind(value[0], "timestamptz"), self.bind(value[1], "int2")
            if op == "=":
                return f"({target.column} = {micros} AND {nanos} = 0)"
            return f"({target.column}, 0::int2) {op} ({micros}, {nanos})"
        if target.kind == "boolean":
            return f"{target.column} {op} {self.bind(value, 'boolean')}"
        assert isinstance(value, Decimal | int) and not isinstance(value, bool)
        return f"{target.column} {op} {self.bind(int(value), 'bigint')}"


def render_sql(
    predicate: Predicate, columns: EventColumns | None = None, *, first_param: int = 1
) -> CompiledFilter:
    """The SQL of a checked predicate, its placeholders numbered from `first_param` (so it can
    follow the caller's own parameters)."""
    renderer = _Renderer(columns or EventColumns(), first_param)
    sql = renderer.render(predicate)
    return CompiledFilter(sql, tuple(renderer.params))
