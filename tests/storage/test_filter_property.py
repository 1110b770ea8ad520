"""Property: any filter text either compiles or is refused with a FilterError (INVALID_ARGUMENT),
never another exception; and whatever compiles runs on Postgres without an error (so no input
reaches the database as a query it refuses: a bad cast, a numeric overflow, a NUL)."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.storage.filters import CompiledFilter, FilterError, compile_filter
from tests.storage.test_filter_sql import OPEN_SCOPE, SCOPE, conn

__all__ = ["conn"]  # the fixture, from the SQL tests

_FIELDS = st.sampled_from(
    [
        "payload.amount",
        "payload.currency",
        "payload.qty",
        "payload.paid",
        "payload.customer",
        "payload.customer.tier",
        "payload.customer.tier.deeper",
        "payload.tags",
        "payload",
        "payload.nope",
        'payload."a b"',
        "attributes",
        "attributes.region",
        'attributes."x.y"',
        "key",
        "type",
        "id",
        "event_time",
        "event_time.x",
        "foo",
    ]
)
_OPS = st.sampled_from(["=", "!=", "<", "<=", ">", ">=", ":"])
_VALUES = st.one_of(
    st.sampled_from(
        [
            "*",
            "true",
            "false",
            "10",
            "-1.5e3",
            "1e99999",
            "1e-16000",
            "0",
            "gold",
            "eu-west-1",
            '"gold*"',
            "'%_*'",
            '"*\\\\*"',
            '"2026-01-01T00:00:00Z"',
            '"2026-01-01T00:00:00.123456789+05:30"',
            '"9999-12-31T23:59:59.999999999Z"',
            '"0001-01-01T00:00:00Z"',
            '"0000-01-01T00:00:00Z"',
            '"\\u0000"',
            '"\\ud800"',
        ]
    ),
    st.text(max_size=8).map(json.dumps),
    st.text(max_size=8).map(lambda text: json.dumps(text, ensure_ascii=False)),
    st.integers().map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
)
_RESTRICTIONS = st.one_of(
    st.tuples(_FIELDS, _OPS, _VALUES).map(lambda parts: f"{parts[0]} {parts[1]} {parts[2]}"),
    _FIELDS,
)
_STRINGS = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
_QUOTED = st.one_of(
    _STRINGS.map(json.dumps), _STRINGS.map(lambda text: json.dumps(text, ensure_ascii=False))
)
_GLOBS = st.lists(st.sampled_from(["*", "%", "_", "\\\\", "a", "é", "'"]), max_size=5).map(
    lambda parts: json.dumps("".join(parts))
)
_ORDERING = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])
_INSTANTS = st.builds(
    lambda moment, nanos: f'"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"',
    st.datetimes(),
    st.integers(0, 999_999_999),
)
_WELL_TYPED = st.one_of(
    st.tuples(
        st.sampled_from(["payload.amount", "payload.qty"]),
        _ORDERING,
        st.one_of(st.integers(), st.decimals(allow_nan=False, allow_infinity=False)).map(str),
    ).map(" ".join),
    st.tuples(
        st.sampled_from(
            ["payload.currency", "payload.customer.tier", "key", "type", "id", "attributes.region"]
        ),
        st.one_of(_ORDERING, st.just(":")),
        st.one_of(_QUOTED, _GLOBS),
    ).map(" ".join),
    st.tuples(
        st.just("payload.paid"), st.sampled_from(["=", "!="]), st.sampled_from(["true", "false"])
    ).map(" ".join),
    st.tuples(st.just("event_time"), _ORDERING, _INSTANTS).map(" ".join),
    st.tuples(st.just("payload.tags:"), _QUOTED).map("".join),
    _FIELDS.map(lambda field: f"{field}:*"),
    st.sampled_from(["payload.customer:tier", "payload:amount", "attributes:region"]),
)
_FILTERS = st.recursive(
    st.one_of(_WELL_TYPED, _RESTRICTIONS),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(" AND ".join),
        st.tuples(inner, inner).map(" OR ".join),
        st.tuples(inner, inner).map(" ".join),
        inner.map(lambda text: f"NOT ({text})"),
        inner.map(lambda text: f"-{text}"),
        inner.map(lambda text: f"({text})"),
    ),
    max_leaves=8,
)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    """A well-formed filter with one character inserted, dropped or replaced."""
    text = draw(_FILTERS)
    at = draw(st.integers(0, len(text)))
    char = draw(st.sampled_from(list("()\"'\\:=<>!-*. ANDORT\x00é")))
    how = draw(st.sampled_from(["insert", "drop", "replace"]))
    if how == "insert":
        return text[:at] + char + text[at:]
    if how == "drop":
        return text[:at] + text[at + 1 :]
    return text[:at] + char + text[at + 1 :]


_ANY_TEXT = st.one_of(_FILTERS, _mutated(), st.text(max_size=60))


def _compiled(text: str, open_scope: bool) -> CompiledFilter | None:
    try:
        return compile_filter(text, OPEN_SCOPE if open_scope else SCOPE)
    except FilterError as error:
        assert error.message.startswith("filter: ") and f"at column {error.column}" in error.message
        assert 1 <= error.column <= len(text) + 1
        return None


@settings(max_examples=500, deadline=None)
@given(text=_ANY_TEXT, open_scope=st.booleans())
def test_any_text_compiles_or_is_refused_as_invalid_argument(text: str, open_scope: bool) -> None:
    compiled = _compiled(text, open_scope)
    if compiled is not None:
        placeholders = {int(number) for number in re.findall(r"\$(\d+)", compiled.sql)}
        assert placeholders == set(range(1, len(compiled.params) + 1))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(text=st.one_of(_FILTERS, _mutated()), open_scope=st.booleans())
async def test_what_compiles_runs_on_postgres(conn: Any, text: str, open_scope: bool) -> None:
    compiled = _compiled(text, open_scope)
    if compiled is not None:
        statement = f"SELECT count(*) FROM events WHERE {compiled.sql}"  # noqa: S608
        count = await conn.fetchval(statement, *compiled.params)
        assert 0 <= count <= 14
