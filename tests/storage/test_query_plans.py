"""Every query shape the query API can produce has an index it uses: a 50k-row events table
over several tenants (one holding half the rows), keys, types and a month of event times (and
of ingest times, so the rows lie in 31 daily partitions and the default one, migration 0012),
ANALYZEd; EXPLAIN of each page, count and aggregate statement, with the settings a query's
transaction runs under (services.storage.queries.SESSION_SETTINGS); a sequential scan of
events or of any of its partitions anywhere in a plan fails the test, and so does a plan that
reads them without an index (one that reads nothing, a contradiction the planner saw, passes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.filters import FieldScope, payload_fields
from services.storage.filters.check import check_filter
from services.storage.filters.syntax import parse_filter
from services.storage.partitions import PartitionPolicy, maintain, range_partitions
from services.storage.queries import (
    SESSION_SETTINGS,
    GroupBy,
    Selection,
    aggregate_sql,
    count_sql,
    page_sql,
)
from services.storage.times import PG_EPOCH_SECONDS
from tests.storage.conftest import schema_connection

ROWS = 50_000
BIG = "big"
"""The tenant with half the rows: the one the planner is most tempted to seq-scan for."""
DAY = 86_400 * 1_000_000
START = (1_767_225_600 - PG_EPOCH_SECONDS) * 1_000_000  # 2026-01-01, Postgres microseconds
SCOPE = FieldScope(
    {
        "order.created": payload_fields(
            {
                "type": "object",
                "properties": {"amount": {"type": "number"}, "region": {"type": "string"}},
            }
        )
    },
    allow_undeclared=True,
)
FILTERS = [
    "",
    "payload.amount > 500",
    'payload.region = "eu" AND payload.amount < 10',
    'attributes.channel = "web"',
    'type:"order.*"',
    'key = "k7" OR key = "k8"',
    'NOT payload.region = "eu"',
    'event_time >= "2026-01-10T00:00:00Z"',
]
SELECTIONS: dict[str, dict[str, Any]] = {
    "tenant": {},
    "keys": {"keys": ("k1", "k2", "k3")},
    "one key": {"keys": ("k5",)},
    "types": {"types": ("order.created", "order.paid")},
    "one type": {"types": ("user.signup",)},
    "time range": {"start_time": (START + 3 * DAY, 0), "end_time": (START + 4 * DAY, 0)},
    "keys and time": {"keys": ("k1",), "start_time": (START + 3 * DAY, 0)},
    "types and time": {"types": ("order.paid",), "end_time": (START + DAY, 0)},
    "keys and types": {"keys": ("k1", "k2"), "types": ("order.created",)},
}


@pytest.fixture
async def conn(engine: AsyncEngine, database_url: str, pg_schema: str) -> AsyncIterator[Any]:
    async with schema_connection(database_url, pg_schema) as connection:
        await _fill(connection)
        yield connection


async def _fill(connection: Any) -> None:
    # Daily partitions for January 2026 instead of the one the migration made for everything
    # before its day (empty here); a few rows land in the default partition (February).
    for name in await range_partitions(connection):
        await connection.execute(f"DROP TABLE {name}")
    january = datetime(2026, 1, 1, tzinfo=UTC)
    report = await maintain(connection, PartitionPolicy(days_ahead=30), now=january)
    assert len(report.created) == 31
    tenants = "ARRAY['big','big','big','big','big','acme','globex','initech','umbrella','hooli']"
    await connection.execute(
        "INSERT INTO events (tenant, id, key, type, event_time, event_time_nanos, payload,"  # noqa: S608 (this test's constants)
        " content_type, attributes, partition, ingest_time, producer)"
        f" SELECT ({tenants})[1 + n % 10], 'e' || n, 'k' || (n % 200),"
        " (ARRAY['order.created','order.paid','order.shipped','user.signup','user.login',"
        "  'cart.viewed'])[1 + n % 6],"
        f" timestamptz '2026-01-01 00:00:00+00' + n * interval '{30 * 86_400 / ROWS} seconds', 0,"
        " convert_to(json_build_object('amount', n % 1000, 'region',"
        "  (ARRAY['eu','us','apac'])[1 + n % 3])::text, 'UTF8'), '',"
        " json_build_object('channel', (ARRAY['web','app'])[1 + n % 2])::jsonb, n % 8,"
        f" timestamptz '2026-01-01 00:00:00+00' + n * interval '{31.5 * 86_400 / ROWS} seconds',"
        " 'p'"
        f" FROM generate_series(1, {ROWS}) AS n"
    )
    await connection.execute("VACUUM ANALYZE events")


def _selection(shape: dict[str, Any], expression: str) -> Selection:
    node = parse_filter(expression)
    predicate = check_filter(node, SCOPE) if node is not None else None
    return Selection(tenant=BIG, predicate=predicate, **shape)


def _statements() -> Iterator[tuple[str, str, list[object]]]:
    for name, shape in SELECTIONS.items():
        for expression in FILTERS:
            selection = _selection(shape, expression)
            label = f"{name} / {expression or 'no filter'}"
            yield (f"page {label}", *page_sql(selection, after_seq=0, limit=101))
            yield (f"next page {label}", *page_sql(selection, after_seq=ROWS // 2, limit=1001))
            yield (f"count {label}", *count_sql(selection, max_rows=1_000_000))
            group_by: GroupBy
            for group_by in ("", "key", "type"):
                sql, args = aggregate_sql(
                    selection,
                    group_by=group_by,
                    field=("amount",),
                    max_rows=1_000_000,
                    max_groups=100,
                )
                yield (f"aggregate by {group_by or 'nothing'} {label}", sql, args)


def _scans(plan: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    yield plan["Node Type"], plan.get("Relation Name", ""), plan.get("Index Name", "")
    if plan.get("One-Time Filter") == "false":
        yield "Nothing", "", ""
    for child in plan.get("Plans", ()):
        yield from _scans(child)


async def test_every_query_shape_uses_an_index_of_events(conn: Any) -> None:
    seq_scans, without_index, shapes = [], [], 0
    for label, sql, args in _statements():
        shapes += 1
        async with conn.transaction(readonly=True):
            await conn.execute(SESSION_SETTINGS, "30000")
            (plan,) = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
        scans = list(_scans(plan["Plan"]))
        if any(node == "Seq Scan" and table.startswith("events") for node, table, _ in scans):
            seq_scans.append(label)
        reads_nothing = any(node == "Nothing" for node, _, _ in scans) and not any(
            table.startswith("events") or index for _, table, index in scans
        )
        if not reads_nothing and not any(index.startswith("events_") for _, _, index in scans):
            without_index.append(label)
    assert shapes == len(SELECTIONS) * len(FILTERS) * 6
    assert seq_scans == [], "sequential scans of events:\n" + "\n".join(seq_scans)
    assert without_index == [], "no events index used:\n" + "\n".join(without_index)


async def test_the_settings_only_steer_the_plans_they_must(conn: Any) -> None:
    """Without SESSION_SETTINGS, a narrow shape already uses its index: the setting is a guard
    for the broad ones (of the shapes above, 25 of 216 seq-scanned without it on this table,
    all over the big tenant with no key, type or time bound), not what makes an index usable."""
    sql, args = page_sql(_selection({"keys": ("k5",)}, ""), after_seq=0, limit=101)
    (plan,) = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
    scans = list(_scans(plan["Plan"]))
    assert any("_tenant_key_seq_idx" in index for _, _, index in scans), scans
