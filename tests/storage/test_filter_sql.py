"""Compiled filters against real Postgres: the storage migrations' events table plus a jsonb
payload column, a set of rows chosen to separate near misses, and for each filter the exact ids
it must return (worked out by hand from the rows and the semantics in
services.storage.filters, not from the compiler's output)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.filters import (
    CompiledFilter,
    EventColumns,
    FieldScope,
    FilterError,
    compile_filter,
    payload_fields,
)
from services.storage.times import PG_EPOCH_SECONDS
from tests.storage.conftest import schema_connection

ORDER_CREATED = {
    "type": "object",
    "properties": {
        "amount": {"type": "number"},
        "currency": {"type": "string"},
        "qty": {"type": "integer"},
        "paid": {"type": "boolean"},
        "customer": {
            "type": "object",
            "properties": {"tier": {"type": "string"}, "name": {"type": "string"}},
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}
ORDER_SHIPPED = {
    "type": "object",
    "properties": {
        "amount": {"type": "number"},
        "carrier": {"type": "string"},
        "customer": {"type": "object", "properties": {"tier": {"type": "string"}}},
    },
}
SCOPE = FieldScope(
    {
        "order.created": payload_fields(ORDER_CREATED),
        "order.shipped": payload_fields(ORDER_SHIPPED),
    }
)
OPEN_SCOPE = FieldScope(SCOPE.schemas, allow_undeclared=True)
INJECTION = "'; DROP TABLE events; --"

# id, key, type, event_time (RFC 3339, nanoseconds allowed), payload (None: not JSON), attributes
ROWS: list[tuple[str, str, str, str, Any, dict[str, str]]] = [
    ("e01", "k1", "order.created", "2026-01-01T00:00:00Z",
     {"amount": 10, "currency": "EUR", "qty": 1, "paid": True,
      "customer": {"tier": "gold", "name": "Zoë"}, "tags": ["vip", "eu"]}, {"region": "eu"}),
    ("e02", "k1", "order.created", "2026-01-01T00:00:01Z",
     {"amount": 10.5, "currency": "USD", "qty": 2, "paid": False,
      "customer": {"tier": "silver"}, "tags": []}, {"region": "us"}),
    ("e03", "k2", "order.created", "2026-01-02T00:00:00Z",
     {"amount": 100, "currency": "EUR", "qty": 10, "paid": True, "customer": {"tier": "gold"}},
     {"region": "eu", "channel": "web"}),
    ("e04", "k2", "order.created", "2026-01-02T00:00:00.000000500Z",
     {"amount": -5, "currency": "50%_off", "qty": 0}, {}),
    # Not what the schema says: amount as a string must not compare as a number.
    ("e05", "k3", "order.shipped", "2026-01-03T00:00:00Z",
     {"amount": "10", "carrier": "dhl"}, {"region": "eu"}),
    ("e06", "k3", "order.shipped", "2026-01-03T12:00:00Z",
     {"carrier": "ups", "customer": {"tier": "bronze"}}, {"region": "apac"}),
    ("e07", "k4", "order.created", "2026-01-04T00:00:00Z",
     {"amount": 1e3, "currency": "GBP", "customer": {"tier": 'gold"' + INJECTION}},
     {"region": "eu" + INJECTION}),
    ("e08", "k4", "order.created", "2026-01-05T00:00:00Z",
     {"amount": 0.1, "currency": "日本円", "note": "50_off"}, {"région": "ü"}),
    ("e09", "k5", "order.created", "2026-01-06T00:00:00Z", None, {"region": "eu"}),
    ("e10", "k5", "user.signup", "2026-01-07T00:00:00Z", {"plan": "pro"}, {}),
    ("e11", "a%b", "order.cancelled", "2026-01-08T00:00:00Z", {}, {}),
    ("e12", "a_b", "order_created", "2026-01-09T00:00:00Z", {}, {}),
    ("e13", "axb", "order.created", "2026-01-10T00:00:00Z", {}, {}),
    ("e14", "a%bc", "order.created", "2026-01-11T00:00:00Z", {}, {}),
]  # fmt: skip
ALL = {row[0] for row in ROWS}

CASES: list[tuple[str, set[str]]] = [
    # numbers: a string "10" (e05) is not the number 10; 1e3 is 1000
    ("payload.amount > 10", {"e02", "e03", "e07"}),
    ("payload.amount = 10", {"e01"}),
    ("payload.amount = 1000", {"e07"}),
    ("payload.amount = 10.50", {"e02"}),
    ("payload.amount >= 10 AND payload.amount < 100", {"e01", "e02"}),
    ("payload.amount < 0", {"e04"}),
    ("payload.amount <= -5.0", {"e04"}),
    ("payload.amount > 1e6", set()),
    ("payload.amount != 10", {"e02", "e03", "e04", "e07", "e08"}),
    ("payload.qty = 10", {"e03"}),
    # strings, != requires the field, NOT is the complement
    ('payload.currency = "EUR"', {"e01", "e03"}),
    ('payload.currency != "EUR"', {"e02", "e04", "e07", "e08"}),
    ('NOT payload.currency = "EUR"', ALL - {"e01", "e03"}),
    ('-payload.currency = "EUR"', ALL - {"e01", "e03"}),
    ("payload.currency = EUR", {"e01", "e03"}),
    ('payload.customer.tier < "h"', {"e01", "e03", "e06", "e07"}),
    # nested paths, unicode
    ('payload.customer.tier = "gold"', {"e01", "e03"}),
    ('payload.customer.tier = "gold" OR payload.customer.tier = "bronze"', {"e01", "e03", "e06"}),
    ('payload.customer.name = "Zoë"', {"e01"}),
    ('payload.customer.name = "Zo\\u00eb"', {"e01"}),
    ('payload.currency = "日本円"', {"e08"}),
    # AIP-160 precedence: OR before the implicit AND before AND
    ('payload.paid = true AND payload.currency = "EUR" OR payload.currency = "GBP"', {"e01", "e03"}),
    ('payload.currency = "EUR" payload.qty > 1', {"e03"}),
    ('(payload.currency = "EUR" OR payload.currency = "USD") payload.paid = false', {"e02"}),
    ('key = "k1" OR key = "k2" AND payload.paid = true', {"e01", "e03"}),
    ('(key = "k1" OR key = "k2") AND NOT (payload.paid = true)', {"e02", "e04"}),
    ("NOT (payload.paid = true OR payload.paid = false)", ALL - {"e01", "e02", "e03"}),
    # booleans
    ("payload.paid = true", {"e01", "e03"}),
    ("payload.paid != true", {"e02"}),
    # presence and the has operator
    ("payload:*", ALL - {"e09"}),
    ("payload:amount", {"e01", "e02", "e03", "e04", "e05", "e07", "e08"}),
    ("payload.tags:*", {"e01", "e02"}),
    ("payload.tags:vip", {"e01"}),
    ('payload.tags:"eu"', {"e01"}),
    ("payload.customer:tier", {"e01", "e02", "e03", "e06", "e07"}),
    ("payload.customer.tier:*", {"e01", "e02", "e03", "e06", "e07"}),
    # envelope fields and globs; % and _ are themselves
    ('type:"order.*"', ALL - {"e10", "e12"}),
    ('type:"*_created"', {"e12"}),
    ('type:"order.created"', {"e01", "e02", "e03", "e04", "e07", "e08", "e09", "e13", "e14"}),
    ('key:"a%*"', {"e11", "e14"}),
    ('key:"a_*"', {"e12"}),
    ('key:"a_b"', {"e12"}),
    ('key:"*%b*"', {"e11", "e14"}),
    ('key:"a*b"', {"e11", "e12", "e13"}),
    ('payload.currency:"50%*"', {"e04"}),
    ('payload.currency:"*%_*"', {"e04"}),
    ('payload.currency:"*_*"', {"e04"}),
    ('id = "e05"', {"e05"}),
    ('id >= "e13"', {"e13", "e14"}),
    ("key:*", ALL),
    # attributes
    ('attributes.region = "eu"', {"e01", "e03", "e05", "e09"}),
    ("attributes.region = eu", {"e01", "e03", "e05", "e09"}),
    ('attributes.region != "eu"', {"e02", "e06", "e07"}),
    ('attributes.region:"eu*"', {"e01", "e03", "e05", "e07", "e09"}),
    ("attributes:channel", {"e03"}),
    ("attributes:*", ALL - {"e04", "e10", "e11", "e12", "e13", "e14"}),
    ("NOT attributes:region", {"e04", "e08", "e10", "e11", "e12", "e13", "e14"}),
    ('attributes."région" = "ü"', {"e08"}),
    ('attributes:"région"', {"e08"}),
    # event_time, to the nanosecond
    ('event_time >= "2026-01-02T00:00:00Z" AND event_time < "2026-01-03T00:00:00Z"', {"e03", "e04"}),
    ('event_time > "2026-01-02T00:00:00Z" event_time < "2026-01-03T00:00:00Z"', {"e04"}),
    ('event_time = "2026-01-02T00:00:00.0000005Z"', {"e04"}),
    ('event_time = "2026-01-02T01:00:00.0000005+01:00"', {"e04"}),
    ('event_time <= "2026-01-01T00:00:01Z"', {"e01", "e02"}),
    ('event_time != "2026-01-01T00:00:00Z" event_time < "2026-01-02T00:00:00Z"', {"e02"}),
    # injection attempts in literals and names are values like any other
    (f'payload.customer.tier = "gold\\"{INJECTION}"', {"e07"}),
    (f'attributes.region = "eu{INJECTION}"', {"e07"}),
    (f'attributes."region{INJECTION}" = "x"', set()),
    (f"attributes:\"region{INJECTION}\" OR key = 'k1\\' OR 1=1 --'", set()),
    ("payload.customer.tier = \"') OR TRUE OR ('\"", set()),
    ('payload.currency:"*\' OR \'\'=\'*"', set()),
    # empty: everything
    ("", ALL),
    ("   ", ALL),
]  # fmt: skip

OPEN_CASES: list[tuple[str, set[str]]] = [
    # allow_undeclared: the literal types an undeclared field
    ('payload.note:"50_*"', {"e08"}),
    ('payload.plan = "pro"', {"e10"}),
    (f'payload."amount{INJECTION}" > 1', set()),
    ('payload."x\\") OR true --".y = 1', set()),
]


def _micros(rfc3339: str) -> tuple[int, int]:
    seconds, _, fraction = rfc3339.rstrip("Z").partition(".")
    moment = dt.datetime.fromisoformat(seconds).replace(tzinfo=dt.UTC)
    nanos = int((fraction or "0").ljust(9, "0"))
    unix = int(moment.timestamp())
    return (unix - PG_EPOCH_SECONDS) * 1_000_000 + nanos // 1000, nanos % 1000


@pytest.fixture
async def conn(engine: AsyncEngine, database_url: str, pg_schema: str) -> AsyncIterator[Any]:
    """A connection to the migrated schema, whose events table has the filter's jsonb column
    and the indexes the compiler's SQL is written for, filled with ROWS."""
    async with schema_connection(database_url, pg_schema) as connection:
        await _fill(connection)
        yield connection


async def _fill(connection: Any) -> None:
    await connection.execute(
        "ALTER TABLE events ADD COLUMN payload_json jsonb;"
        "CREATE INDEX events_payload_json_idx ON events USING gin (payload_json jsonb_path_ops);"
        "CREATE INDEX events_attributes_idx ON events USING gin (attributes);"
    )
    records = []
    for event_id, key, type_, when, payload, attributes in ROWS:
        micros, nanos = _micros(when)
        body = json.dumps(payload, ensure_ascii=False) if payload is not None else None
        records.append(
            (event_id, key, type_, micros, nanos, (body or "opaque").encode(), body,
             json.dumps(attributes, ensure_ascii=False))
        )  # fmt: skip
    await connection.executemany(
        "INSERT INTO events (id, key, type, event_time, event_time_nanos, payload, content_type,"
        " payload_json, attributes, partition, ingest_time, producer)"
        " VALUES ($1, $2, $3, $4, $5, $6, 'application/json', $7::jsonb, $8::jsonb, 0, $4, 'p')",
        records,
    )


async def _ids(
    conn: Any, compiled: CompiledFilter, head: str = "SELECT id FROM events WHERE", *args: object
) -> set[str]:
    statement = f"{head} {compiled.sql}"
    return {row["id"] for row in await conn.fetch(statement, *args, *compiled.params)}


async def test_each_filter_returns_exactly_the_expected_events(conn: Any) -> None:
    wrong = []
    for text, expected in CASES:
        got = await _ids(conn, compile_filter(text, SCOPE))
        if got != expected:
            wrong.append(f"{text!r}: got {sorted(got)}, expected {sorted(expected)}")
    for text, expected in OPEN_CASES:
        got = await _ids(conn, compile_filter(text, OPEN_SCOPE))
        if got != expected:
            wrong.append(f"(open) {text!r}: got {sorted(got)}, expected {sorted(expected)}")
    assert not wrong, "\n".join(wrong)
    assert await conn.fetchval("SELECT count(*) FROM events") == len(ROWS)  # still there


async def test_placeholders_follow_the_callers_own(conn: Any) -> None:
    compiled = compile_filter(
        'payload.currency = "EUR" OR attributes.region = "us"', SCOPE, first_param=2
    )
    ids = await _ids(conn, compiled, "SELECT id FROM events WHERE key = $1 AND", "k1")
    assert ids == {"e01", "e02"}


async def test_qualified_column_names(conn: Any) -> None:
    columns = EventColumns(
        **{name: f"e.{name}" for name in ("id", "key", "type", "attributes", "payload_json")}
    )
    compiled = compile_filter('payload.amount > 10 type:"order.*"', SCOPE, columns)
    ids = await _ids(conn, compiled, "SELECT e.id FROM events e WHERE")
    assert ids == {"e02", "e03", "e07"}


async def test_injection_in_a_field_name_is_refused_when_undeclared() -> None:
    with pytest.raises(FilterError, match="unknown field"):
        compile_filter(f'payload."amount{INJECTION}" > 1', SCOPE)
    with pytest.raises(ValueError, match="payload_json"):
        EventColumns(payload_json="payload_json; DROP TABLE events")


def _plan(rows: list[Any]) -> str:
    return "\n".join(row[0] for row in rows)


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ('payload.customer.tier = "gold"', "events_payload_json_idx"),
        ("payload.tags:vip", "events_payload_json_idx"),
        ('attributes.region = "eu"', "events_attributes_idx"),
        ("attributes:channel", "events_attributes_idx"),
        ('type:"order.*"', "events_tenant_type_seq_idx"),
        ('key = "k1"', "events_tenant_key_seq_idx"),
        ('key > "k3"', "events_tenant_key_seq_idx"),
        ('event_time >= "2026-01-02T00:00:00Z"', "events_tenant_event_time_idx"),
    ],
)
async def test_the_forms_meant_for_an_index_can_use_it(conn: Any, text: str, index: str) -> None:
    # Few rows: forbid the sequential scan, so the plan shows whether the index is usable at all
    # (the cost-based choice on a real table is the EXPLAIN test of the query shapes).
    compiled = compile_filter(text, SCOPE)
    await conn.execute("SET enable_seqscan = off; ANALYZE events")
    # The migrations' btree indexes lead with the tenant, as every query names one; the gin
    # indexes are this test's own and tenant-blind.
    scope = "tenant = 'default' AND " if index.startswith("events_tenant") else ""
    statement = await conn.prepare(f"EXPLAIN SELECT id FROM events WHERE {scope}({compiled.sql})")  # noqa: S608
    plan = _plan(await statement.fetch(*compiled.params))
    # events is partitioned (migration 0012): each partition scans its own copy of the index
    # (the rows' partition does; the empty default partition may pick any index).
    copies = await conn.fetch(
        "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = $1::regclass",
        index,
    )
    assert any(f" {row[0]} " in plan for row in copies), plan
    assert "Seq Scan" not in plan, plan
