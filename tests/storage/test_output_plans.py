"""Every shape of the output listings (services.storage.output_queries) walks its listing's own
index, as tests/storage/test_query_plans.py checks for events: 20k-row alerts, window_results
and late_events tables over several tenants (one holding half the rows), ANALYZEd; EXPLAIN of
the first and a later page of each listing with each filter, under the query API's session
settings. A sequential scan of the table, or a plan that reads it without one of its indexes,
fails the test; so does an unfiltered page that does not walk its listing's index in order
(without a sort). A selective filter may take another plan (a bitmap of the tenant's range and
a sort of what matched), which the planner prices lower."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.output_queries import (
    ALERTS,
    LATE_EVENTS,
    WINDOW_RESULTS,
    Listing,
    listing_sql,
)
from services.storage.queries import SESSION_SETTINGS
from tests.storage.conftest import schema_connection
from tests.storage.test_query_plans import _scans

ROWS = 20_000
TENANTS = "ARRAY['big','big','big','big','big','acme','globex','initech','umbrella','hooli']"
JAN_1 = 1_767_225_600 * 1_000_000_000
MINUTE = 60_000_000_000

SHAPES: dict[str, tuple[Listing, str, dict[str, str], list[str], list[Any]]] = {
    "alerts": (
        ALERTS,
        "alerts_by_time",
        {},
        [
            "",
            'rule_id = "r3"',
            'rule_id = "r3" AND rule_version >= 2',
            'key = "k7" OR key = "k8"',
            'NOT rule_kind = "rate"',
            'last_event_time >= "2026-01-10T00:00:00Z"',
            'create_time < "2030-01-01T00:00:00Z" AND alert_id:"a1*"',
        ],
        [JAN_1 + ROWS // 2 * MINUTE, "a100"],
    ),
    "alerts of a rule": (
        ALERTS,
        "alerts_by_rule",
        {"rule_id": "r3"},
        ["", 'key = "k1"'],
        [JAN_1, "a"],
    ),
    "window results": (
        WINDOW_RESULTS,
        "window_results_by_start",
        {},
        [
            "",
            'window_id = "w2"',
            'group = "k3" AND revision = 0',
            "values.total > 100",
            'start_time >= "2026-01-10T00:00:00Z" AND retracted = false',
        ],
        ["w1", JAN_1, 1, 0, "k1", JAN_1, 0],
    ),
    "window results of a window": (
        WINDOW_RESULTS,
        "window_results_by_start",
        {"window_id": "w2"},
        ["", 'key = "k3"', 'end_time < "2026-01-05T00:00:00Z"'],
        ["w2", JAN_1, 1, 0, "k1", JAN_1, 0],
    ),
    "late events": (
        LATE_EVENTS,
        "late_events_by_time",
        {},
        [
            "",
            'source = "window"',
            'definition_id = "w2" AND definition_version = 1',
            'event_key = "k5" OR reason:"*watermark"',
            'event_time < "2026-01-03T00:00:00Z"',
        ],
        [JAN_1 + ROWS // 2 * MINUTE, "window", "w1", 1, "e1", 0],
    ),
}


@pytest.fixture
async def conn(engine: AsyncEngine, database_url: str, pg_schema: str) -> AsyncIterator[Any]:
    async with schema_connection(database_url, pg_schema) as connection:
        await _fill(connection)
        yield connection


async def _fill(connection: Any) -> None:
    series = f"FROM generate_series(1, {ROWS}) AS n"
    tenant = f"({TENANTS})[1 + n % 10]"
    await connection.execute(
        "INSERT INTO alerts (tenant, alert_id, rule_id, rule_version, rule_kind, key,"
        " first_event_nanos, last_event_nanos, event_ids, detail)"
        f" SELECT {tenant}, 'a' || n, 'r' || (n % 20), 1 + n % 3,"
        " (ARRAY['threshold','rate','sequence','absence'])[1 + n % 4], 'k' || (n % 200),"
        f" {JAN_1} + n::bigint * {MINUTE}, {JAN_1} + n::bigint * {MINUTE} + 1,"
        f" ARRAY['e' || n], '{{}}'::jsonb {series}"
    )
    await connection.execute(
        "INSERT INTO window_results (tenant, window_id, window_version, partition, group_key,"
        ' start_nanos, end_nanos, revision, "values", watermark_nanos, retracted)'
        f" SELECT {tenant}, 'w' || (n % 5), 1, n % 4, 'k' || (n % 200),"
        f" {JAN_1} + n::bigint * {MINUTE}, {JAN_1} + (n + 1)::bigint * {MINUTE}, n % 2,"
        f" json_build_object('total', n % 500)::jsonb, {JAN_1} + (n + 2)::bigint * {MINUTE},"
        f" n % 50 = 0 {series}"
    )
    await connection.execute(
        "INSERT INTO late_events (tenant, source, definition_id, definition_version, event_id,"
        " window_start_nanos, window_end_nanos, event_key, event_time_nanos, watermark_nanos,"
        " reason)"
        f" SELECT {tenant}, (ARRAY['rule','window'])[1 + n % 2], 'w' || (n % 5), 1, 'e' || n,"
        f" 0, 0, 'k' || (n % 200), {JAN_1} + n::bigint * {MINUTE},"
        f" {JAN_1} + (n + 9)::bigint * {MINUTE}, 'beyond allowed lateness' {series}"
    )
    for table in ("alerts", "window_results", "late_events"):
        await connection.execute(f"VACUUM ANALYZE {table}")


def _statements() -> Iterator[tuple[str, Listing, str, str, list[object]]]:
    for name, (listing, index, equal, filters, later) in SHAPES.items():
        for text in filters:
            for after in (None, later):
                label = f"{name} / {text or 'no filter'} / {'later page' if after else 'first'}"
                sql, args = listing_sql(
                    listing, "big", equal=equal, after=after, filter_expression=text, limit=101
                )
                yield label, listing, index, sql, args


async def test_every_listing_shape_walks_its_index(conn: Any) -> None:
    bad: list[str] = []
    shapes = 0
    for label, listing, index, sql, args in _statements():
        shapes += 1
        async with conn.transaction(readonly=True):
            await conn.execute(SESSION_SETTINGS, "30000")
            (plan,) = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
        scans = list(_scans(plan["Plan"]))
        if any(node == "Seq Scan" and table == listing.table for node, table, _ in scans):
            bad.append(f"{label}: sequential scan")
        elif not any(used.startswith(f"{listing.table}_") for _, _, used in scans):
            bad.append(f"{label}: no index of {listing.table} used ({scans})")
        elif "no filter" in label and (
            not any(used == index for _, _, used in scans)
            or any(node in ("Sort", "Incremental Sort") for node, _, _ in scans)
        ):
            bad.append(f"{label}: not in the order of {index} ({scans})")
    assert shapes == 2 * sum(len(shape[3]) for shape in SHAPES.values())
    assert bad == [], "\n".join(bad)


async def test_listing_page_costs_are_printed(conn: Any) -> None:
    """The database time of each first page (EXPLAIN ANALYZE, on this shared machine): figures
    to read, not limits (`pytest tests/storage/test_output_plans.py -s`)."""
    figures: list[tuple[float, str]] = []
    for label, _, _, sql, args in _statements():
        if "later page" in label:
            continue
        async with conn.transaction(readonly=True):
            await conn.execute(SESSION_SETTINGS, "30000")
            explained = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        figures.append((json.loads(explained)[0]["Execution Time"], label))
    figures.sort()
    for milliseconds, label in figures:
        print(f"[output listings] {milliseconds:8.2f} ms  {label}")
    assert len(figures) == sum(len(shape[3]) for shape in SHAPES.values())
