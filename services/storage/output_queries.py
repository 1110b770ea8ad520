"""The listings of the engines' outputs (ListAlerts, ListWindowResults, ListLateEvents): one
tenant's rows in a fixed keyset order, narrowed by the request's id fields and an AIP-160 filter
(services.storage.filters.resources), in pages over storage's asyncpg pool under the query
API's session settings (statement timeout, no sequential scan: services.storage.queries).

Each listing walks one tenant-led btree index in its order (tests/storage/test_output_plans.py
checks the plans): alerts `alerts_by_time` backwards (newest first; `alerts_by_rule` for one
rule_id, migration 0017), window results `window_results_by_start` (one window_id or all),
late events `late_events_by_time` (migration 0017) backwards. The filter narrows what that
range scan reads; for a selective one the planner may prefer a bitmap of the tenant's range
and a sort of what matched (never a sequential scan: SESSION_SETTINGS).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.storage import engine_outputs
from services.storage.engine_output_store import AlertRow, WindowResultRow
from services.storage.filters.resources import (
    ALERT_FIELDS,
    LATE_EVENT_FIELDS,
    WINDOW_RESULT_FIELDS,
    ResourceFields,
    compile_resource_filter,
)
from services.storage.queries import EventQueries
from streammesh.api.common.v1 import definitions_pb2 as common

__all__ = [
    "ALERTS",
    "LATE_EVENTS",
    "WINDOW_RESULTS",
    "Listing",
    "OutputQueries",
    "alert_message",
    "late_event_message",
    "listing_sql",
    "position",
    "result_message",
]


@dataclass(frozen=True)
class Listing:
    """One resource's listing: its table, the columns read, the keyset order (every column
    ascending, or every one descending) with the SQL type of each, and its filter fields."""

    name: str
    table: str
    select: str
    order: tuple[tuple[str, str], ...]
    descending: bool
    fields: ResourceFields

    @property
    def position_types(self) -> tuple[type, ...]:
        return tuple(str if sql_type == "text" else int for _, sql_type in self.order)


ALERTS = Listing(
    "alerts",
    "alerts",
    "alert_id, tenant, rule_id, rule_version, rule_kind, key, first_event_nanos,"
    " last_event_nanos, event_ids, detail::text AS detail, created_at",
    (("last_event_nanos", "bigint"), ("alert_id", "text")),
    descending=True,
    fields=ALERT_FIELDS,
)
WINDOW_RESULTS = Listing(
    "window_results",
    "window_results",
    "tenant, window_id, window_version, partition, group_key, start_nanos, end_nanos, revision,"
    ' "values"::text AS values, watermark_nanos, retracted, emitted_at',
    (
        ("window_id", "text"),
        ("start_nanos", "bigint"),
        ("window_version", "integer"),
        ("partition", "integer"),
        ("group_key", "text"),
        ("end_nanos", "bigint"),
        ("revision", "integer"),
    ),
    descending=False,
    fields=WINDOW_RESULT_FIELDS,
)
LATE_EVENTS = Listing(
    "late_events",
    "late_events",
    "tenant, source, definition_id, definition_version, event_id, event_key, event_time_nanos,"
    " watermark_nanos, window_start_nanos, window_end_nanos, reason",
    (
        ("event_time_nanos", "bigint"),
        ("source", "text"),
        ("definition_id", "text"),
        ("definition_version", "integer"),
        ("event_id", "text"),
        ("window_start_nanos", "bigint"),
    ),
    descending=True,
    fields=LATE_EVENT_FIELDS,
)


def listing_sql(
    listing: Listing,
    tenant: str,
    *,
    equal: Mapping[str, str],
    after: Sequence[Any] | None,
    filter_expression: str,
    limit: int,
) -> tuple[str, list[object]]:
    """The page statement and its arguments: the tenant's rows with `equal`'s columns at their
    values (column names are ours, never a client's), after `after` in the listing's order,
    matching the filter (FilterError when it does not fit the listing's fields)."""
    args: list[object] = [tenant]
    where = ["tenant = $1"]
    for column, value in equal.items():
        args.append(value)
        where.append(f"{column} = ${len(args)}::text")
    columns = ", ".join(column for column, _ in listing.order)
    if after is not None:
        holders = []
        for value, (_, sql_type) in zip(after, listing.order, strict=True):
            args.append(value)
            holders.append(f"${len(args)}::{sql_type}")
        where.append(f"({columns}) {'<' if listing.descending else '>'} ({', '.join(holders)})")
    compiled = compile_resource_filter(filter_expression, listing.fields, first_param=len(args) + 1)
    if compiled is not None:
        where.append(f"({compiled.sql})")
        args.extend(compiled.params)
    direction = " DESC" if listing.descending else ""
    order = ", ".join(f"{column}{direction}" for column, _ in listing.order)
    args.append(limit)
    sql = (
        f"SELECT {listing.select} FROM {listing.table}"  # noqa: S608 (our names; values bound)
        f" WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ${len(args)}"
    )
    return sql, args


def position(listing: Listing, row: asyncpg.Record) -> list[Any]:
    """The keyset position of `row` (what a page token continues after)."""
    return [row[column] for column, _ in listing.order]


_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def _stored_at(micros: int) -> dt.datetime:
    # The pool reads timestamptz as Postgres microseconds (use_integer_timestamps).
    return _PG_EPOCH + dt.timedelta(microseconds=micros)


def alert_message(row: asyncpg.Record) -> common.Alert:
    fields = dict(row)
    fields["created_at"] = _stored_at(fields["created_at"])
    return engine_outputs.alert_message(AlertRow(**fields))


def result_message(row: asyncpg.Record) -> common.WindowResult:
    fields = dict(row)
    fields["emitted_at"] = _stored_at(fields["emitted_at"])
    return engine_outputs.result_message(WindowResultRow(**fields))


_SOURCES = {"rule": common.DEFINITION_KIND_RULE, "window": common.DEFINITION_KIND_WINDOW}


def late_event_message(row: asyncpg.Record) -> common.LateEvent:
    return common.LateEvent(
        tenant=row["tenant"],
        source=_SOURCES[row["source"]],
        definition_id=row["definition_id"],
        definition_version=row["definition_version"],
        event_id=row["event_id"],
        event_key=row["event_key"],
        event_time_unix_nanos=row["event_time_nanos"],
        watermark_unix_nanos=row["watermark_nanos"],
        window_start_unix_nanos=row["window_start_nanos"],
        window_end_unix_nanos=row["window_end_nanos"],
        reason=row["reason"],
    )


class OutputQueries:
    """Pages of a listing, read as the query API reads events (EventQueries.reading)."""

    def __init__(self, queries: EventQueries) -> None:
        self._queries = queries

    async def page(
        self,
        listing: Listing,
        tenant: str,
        *,
        equal: Mapping[str, str],
        after: Sequence[Any] | None,
        filter_expression: str,
        limit: int,
    ) -> list[asyncpg.Record]:
        sql, args = listing_sql(
            listing,
            tenant,
            equal=equal,
            after=after,
            filter_expression=filter_expression,
            limit=limit,
        )
        async with self._queries.reading(f"{listing.name.replace('_', ' ')} list") as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
