"""The SQL of the query API: pages of events, counts and aggregates over one tenant's events,
selected by keys, types, a time range and a checked AIP-160 filter (services.storage.filters).

Every statement names one tenant first and walks a tenant-led btree index of migration 0007:
(tenant, seq) for pages, (tenant, key, seq) / (tenant, type, seq) when keys or types are named,
(tenant, event_time, event_time_nanos) for a time range (tests/storage/test_query_plans.py
checks each shape's plan). Payload fields are read at query time through `payload_jsonb`
(migration 0009, which says why there is no payload column), joined laterally so that it runs
once per row the index range selected, and only when the filter reads the payload.

Bounds: each statement runs in a read-only transaction under `statement_timeout`; counts and
aggregates read at most `max_rows` matching events. Past either, the call is
RESOURCE_EXHAUSTED with a hint, never a partial answer.

Paging is keyset on seq within the tenant (`EventQueries.page`), up to a horizon that every
write still in flight started after (`PAGE_SETTINGS`); what that guarantees while writers
commit, and why, is in `PAGING_GUARANTEE`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from services.storage.filters import EventColumns, FieldScope
from services.storage.filters.check import (
    AllOf,
    AnyOf,
    Contains,
    Negation,
    Payload,
    Predicate,
)
from services.storage.filters.sql import render_sql
from services.storage.retention import GENERATION_SQL, fell_off, read_horizon
from services.storage.schema_scopes import SchemaScopes
from services.storage.store import StoredRow, outage_is_unavailable
from services.storage.times import TimeBound
from streammesh.mesh.errors import ResourceExhausted

__all__ = [
    "NARROW_HINT",
    "PAGE_SETTINGS",
    "PAGING_GUARANTEE",
    "SESSION_SETTINGS",
    "AggregateRow",
    "EventQueries",
    "GroupBy",
    "Page",
    "QueryBounds",
    "Selection",
    "aggregate_sql",
    "count_sql",
    "feed_sql",
    "horizon_sql",
    "page_sql",
    "reads_payload",
    "settled_prefix",
]

PAGING_GUARANTEE = """\
seq is drawn from an identity (CACHE 1, so in the order of real time) while a row is inserted,
and a transaction that drew a lower seq can commit after one that drew a higher seq. So a page
returns a row only once it is settled: when no transaction that could still commit a lower seq
is running. Each page first reads the start of every transaction that holds a write lock on
`events` (pg_locks and pg_stat_activity, about 0.1 ms), the horizon being the earliest of them
or, with none, the page statement's own start; then, in a new snapshot (read committed), it
reads the rows after the cursor in seq order and stops at the first row whose store_time is
not before the horizon (stops, not skips: store_time does not grow with seq across
transactions). store_time is each row's clock_timestamp(), read after its seq was drawn
(migration 0011). Why a returned row R leaves nothing behind it: a transaction G with a lower
seq drew it before R drew its own, so before store_time(R), which is before the horizon, which
is at most the moment pg_locks was read. G takes its lock before it draws a seq and keeps it
until its commit is visible. Had G held it at that moment, the horizon would be at most G's
start, before G's seq: a contradiction. So G had finished: committed (the page's later snapshot
sees it) or rolled back (never visible). So, for a client that pages a query to its end:
- no event is returned twice (seq is unique and the cursor only moves forward);
- no event is skipped: every event that is ever committed with a seq at or below a page's
  cursor was visible to that page or an earlier one, and returned there;
- the last page (no next_page_token) leaves no committed event above its cursor: every event
  committed before the last page was asked for is returned exactly once. A page that reached
  a row not settled yet ends there with a next_page_token, and may hold no events at all: the
  client asks again shortly (the CLI's --all and GatewayClient.query_all wait, bounded).
It holds whatever the writers are (storage's one-statement batches, an operator's open
transaction, a commit stalled on a slow disk or a synchronous standby: each holds its lock until
it is visible), and it needs no timeout. What it assumes: the database clock does not step
backwards while a write is in flight (clock_timestamp() and a transaction's start are read from
it; NTP normally slews), store_time is left to its default (a row written by hand with a future
store_time holds pages back until then), seq is drawn only by the identity of an INSERT into
`events` itself (GENERATED ALWAYS; events is partitioned by ingest_time, migration 0012, and an
insert through `events` locks it for its whole transaction, whichever partition takes the row,
tested; a writer that went to a partition directly would not lock `events`, and storage's
partition maintenance only deletes from partitions directly, which draws no seq), the identity keeps CACHE 1 (tested), pages are read on
the primary (a standby's pg_locks does not show the primary's writers), and storage's role
sees its own sessions' xact_start (track_activities on, the default; a writer whose start it
cannot see, as a prepared transaction or another role's session, counts as infinitely old:
pages wait for it, never skip it). The cost is freshness, not correctness: an event is returned
once every write that started before it was stored has ended, typically a batch insert's
duration; any open write transaction on the table holds every tenant's pages back until it
ends. tests/storage/test_query_paging.py commits a lower seq late on purpose and pages a table
while writers insert concurrently, some holding their transaction open, and checks both points."""
"""What keyset paging on seq guarantees under concurrent inserts (the README repeats it)."""

NARROW_HINT = "narrow the time range, or name keys or types"

GroupBy = Literal["", "key", "type"]

COLUMNS = EventColumns(
    id="e.id",
    key="e.key",
    type="e.type",
    event_time="e.event_time",
    event_time_nanos="e.event_time_nanos",
    attributes="e.attributes",
    payload_json="p.payload_json",
)
"""The filter compiler's names for the events table `e` and the lateral parse `p`."""

# OFFSET 0 keeps the subquery from being pulled up: pulled up, every reference to
# payload_json would call payload_jsonb again (a parse per reference instead of per row).
_PAYLOAD_JOIN = (
    " CROSS JOIN LATERAL"
    " (SELECT payload_jsonb(e.content_type, e.payload) AS payload_json OFFSET 0) AS p"
)
_SELECTED = (
    "e.seq, e.id, e.key, e.type, e.event_time, e.event_time_nanos, e.payload, e.content_type,"
    " e.attributes::text, e.partition, e.ingest_time, e.store_time, e.producer"
)
# Every query names a tenant, and each shape has a tenant-led index (migration 0007). When one
# tenant holds a large share of the table the planner would still pick a sequential scan, which
# reads every other tenant's rows too (and, once the table is distributed by tenant, every
# shard): the query transaction turns that plan off, so a tenant's query costs what its own
# index range costs. tests/storage/test_query_plans.py checks the plans with this setting.
SESSION_SETTINGS = (
    "SELECT set_config('statement_timeout', $1, true), set_config('enable_seqscan', 'off', true)"
)
"""Run first in a query's transaction, with the statement timeout in milliseconds."""


def horizon_sql(table: Literal["events", "alerts", "window_results"]) -> str:
    """The paging horizon of `table` (a fixed name of ours, never a client's) as a scalar
    subquery: the start of the earliest transaction holding a lock on it that lets it write
    rows, else the statement's start (PAGING_GUARANTEE; the engine outputs' tails apply it too)."""
    return (
        "(SELECT least(statement_timestamp(), min(coalesce(a.xact_start, '-infinity')))"  # noqa: S608 (a fixed name)
        " FROM pg_locks AS l LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid"
        f" WHERE l.locktype = 'relation' AND l.relation = '{table}'::regclass"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND l.mode IN"
        " ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock'))"
    )


# The paging horizon (PAGING_GUARANTEE): the start of the earliest transaction holding a lock on
# `events` that lets it write rows, else this statement's start (read before pg_locks is). A
# writer whose start is not visible here (no pg_stat_activity row, as a prepared transaction,
# or a NULL xact_start, as another role's session or a backend read between two transactions)
# counts as -infinity: pages wait for it rather than guess. Run as its own statement, before
# the page's: the page needs a snapshot taken after the locks were read (read committed).
_HORIZON = horizon_sql("events")
PAGE_SETTINGS = SESSION_SETTINGS + ", " + _HORIZON + ", " + GENERATION_SQL
"""SESSION_SETTINGS for a page, as its third column the paging horizon (a timestamptz): a row
whose store_time is before it is settled; as its fourth the retention horizon's generation of
the tenant ($2), read before the page's rows (services.storage.retention)."""


@dataclass(frozen=True, slots=True)
class QueryBounds:
    """Limits of one query statement."""

    statement_timeout_ms: int = 5000
    """Postgres cancels a statement past this; the call is RESOURCE_EXHAUSTED."""
    max_rows: int = 1_000_000
    """Matching events a count or an aggregate reads, at most."""


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events of one tenant: any of `keys` and of `types` (all when empty), within
    `start_time <= event_time < end_time` (open when None), matching `predicate` (a checked
    filter; None matches all)."""

    tenant: str
    keys: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    start_time: TimeBound | None = None
    end_time: TimeBound | None = None
    predicate: Predicate | None = None


@dataclass(frozen=True, slots=True)
class AggregateRow:
    """One group: its key or type ('' without grouping), events, events with a number in the
    field, and the number's sum, min, max and average (None when there is none)."""

    group: str
    count: int
    value_count: int
    sum: float | None
    min: float | None
    max: float | None
    avg: float | None


@dataclass(frozen=True, slots=True)
class Page:
    """The settled rows of a page, in seq order, and whether more may follow: a matching row
    past them exists, settled (beyond the page size) or not (the next page returns it once it
    is; until then a page may hold no rows at all)."""

    rows: list[StoredRow]
    more: bool
    generation: int = 0
    """The tenant's retention generation read before the rows: the token of a later position
    carries it (services.storage.retention)."""


def settled_prefix(rows: Sequence[StoredRow], horizon: int, limit: int) -> Page:
    """The rows before the first one stored at or after `horizon`, at most `limit` of them: a
    row past an unsettled one is not returned even when settled itself, or the cursor would
    pass the unsettled one for good (store_time does not grow with seq across transactions)."""
    end = next((i for i, row in enumerate(rows) if row.store_time >= horizon), len(rows))
    kept = list(rows[: min(end, limit)])
    return Page(kept, more=len(rows) > len(kept))


def reads_payload(predicate: Predicate | None) -> bool:
    """Whether a checked filter reads the payload (and so needs the lateral parse)."""
    if predicate is None:
        return False
    if isinstance(predicate, AllOf | AnyOf):
        return any(reads_payload(item) for item in predicate.items)
    if isinstance(predicate, Negation):
        return reads_payload(predicate.item)
    if isinstance(predicate, Contains):
        return True
    return isinstance(predicate.target, Payload)


class _Statement:
    """Parameters in order, and the `$n` that names each."""

    def __init__(self) -> None:
        self.args: list[object] = []

    def arg(self, value: object, sql_type: str) -> str:
        self.args.append(value)
        return f"${len(self.args)}::{sql_type}"


def _from_where(selection: Selection, statement: _Statement, *, payload: bool = False) -> str:
    """`FROM events e ... WHERE ...` of a selection (the lateral parse when `payload`)."""
    where = [f"e.tenant = {statement.arg(selection.tenant, 'text')}"]
    if selection.keys:
        # One array parameter, not an IN list: one statement text for any key count.
        where.append(f"e.key = ANY({statement.arg(list(selection.keys), 'text[]')})")
    if selection.types:
        where.append(f"e.type = ANY({statement.arg(list(selection.types), 'text[]')})")
    # Row comparisons order by the microsecond, then the nanoseconds below it: the order of the
    # (tenant, event_time, event_time_nanos) index.
    for bound, op in ((selection.start_time, ">="), (selection.end_time, "<")):
        if bound is not None:
            micros = statement.arg(bound[0], "timestamptz")
            nanos = statement.arg(bound[1], "int2")
            where.append(f"(e.event_time, e.event_time_nanos) {op} ({micros}, {nanos})")
    joined = payload or reads_payload(selection.predicate)
    if selection.predicate is not None:
        compiled = render_sql(selection.predicate, COLUMNS, first_param=len(statement.args) + 1)
        statement.args.extend(compiled.params)
        where.append(compiled.sql)
    return f"FROM events e{_PAYLOAD_JOIN if joined else ''} WHERE {' AND '.join(where)}"


def _numeric(path: Sequence[str], statement: _Statement) -> str:
    """The number at `path` of the payload, NULL when it holds anything else."""
    at = f"p.payload_json #> {statement.arg(list(path), 'text[]')}"
    return f"CASE WHEN jsonb_typeof({at}) = 'number' THEN ({at})::numeric END"


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def page_sql(selection: Selection, *, after_seq: int, limit: int) -> tuple[str, list[object]]:
    """The statement (and its arguments) of a page: up to `limit` matching events with
    seq > `after_seq`, in seq order."""
    statement = _Statement()
    source = _from_where(selection, statement)
    after = statement.arg(after_seq, "int8")
    size = statement.arg(limit, "int8")
    sql = f"SELECT {_SELECTED} {source} AND e.seq > {after} ORDER BY e.seq LIMIT {size}"
    return sql, statement.args


def feed_sql(
    tenant: str, predicates: Sequence[Predicate], *, after_seq: int, limit: int
) -> tuple[str, list[object]]:
    """The statement of a live feed's round: up to `limit` of the tenant's events with seq >
    `after_seq`, in seq order, each with one boolean column per predicate (whether it matches),
    so one read serves every subscription's filter expression."""
    statement = _Statement()
    where = f"e.tenant = {statement.arg(tenant, 'text')}"
    verdicts = []
    for predicate in predicates:
        compiled = render_sql(predicate, COLUMNS, first_param=len(statement.args) + 1)
        statement.args.extend(compiled.params)
        verdicts.append(f", coalesce(({compiled.sql}), false)")
    joined = any(reads_payload(predicate) for predicate in predicates)
    after = statement.arg(after_seq, "int8")
    size = statement.arg(limit, "int8")
    sql = (
        f"SELECT {_SELECTED}{''.join(verdicts)}"  # noqa: S608 (fixed terms and placeholders)
        f" FROM events e{_PAYLOAD_JOIN if joined else ''} WHERE {where}"
        f" AND e.seq > {after} ORDER BY e.seq LIMIT {size}"
    )
    return sql, statement.args


def count_sql(selection: Selection, *, max_rows: int) -> tuple[str, list[object]]:
    """The statement of a count that stops one event past `max_rows`."""
    statement = _Statement()
    source = _from_where(selection, statement)
    cap = statement.arg(max_rows + 1, "int8")
    sql = f"SELECT count(*) FROM (SELECT 1 {source} LIMIT {cap}) AS matched"  # noqa: S608 (fixed terms)
    return sql, statement.args


def aggregate_sql(
    selection: Selection,
    *,
    group_by: GroupBy,
    field: Sequence[str] | None,
    max_rows: int,
    max_groups: int,
) -> tuple[str, list[object]]:
    """The statement of an aggregate: per group (largest first) the group, its events, and
    count, sum, min, max and average of the numbers at payload `field`, then the events of all
    groups (to tell whether `max_rows` was passed); at most max_groups + 1 groups."""
    statement = _Statement()
    value = _numeric(field, statement) if field else "NULL::numeric"
    group = {"": "''", "key": "e.key", "type": "e.type"}[group_by]
    source = _from_where(selection, statement, payload=bool(field))
    cap = statement.arg(max_rows + 1, "int8")
    groups = statement.arg(max_groups + 1, "int8")
    # The inner LIMIT stops the scan one event past the bound; the window total tells whether
    # it was reached (windows run before the outer ORDER BY and LIMIT).
    sql = (
        "SELECT g, count(*), count(v), sum(v), min(v), max(v), avg(v), sum(count(*)) OVER ()"  # noqa: S608 (fixed terms)
        f" FROM (SELECT {group} AS g, {value} AS v {source} LIMIT {cap}) AS matched"
        f" GROUP BY g ORDER BY count(*) DESC, g LIMIT {groups}"
    )
    return sql, statement.args


class EventQueries:
    """Reads of the `events` table (and the schema registry's tables, for a filter's scope) over
    storage's asyncpg pool (timestamps as integers)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        bounds: QueryBounds | None = None,
        *,
        acquire_timeout: float = 5.0,
    ) -> None:
        self._pool = pool
        self._bounds = bounds or QueryBounds()
        self._acquire_timeout = acquire_timeout
        self._scopes = SchemaScopes(pool, acquire_timeout=acquire_timeout)

    @property
    def bounds(self) -> QueryBounds:
        return self._bounds

    @asynccontextmanager
    async def _reading(
        self, operation: str, settings: str = SESSION_SETTINGS, *settings_args: object
    ) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Record]]:
        """A connection in a read-only transaction under the statement timeout, and the row
        `settings` returned; a cancelled statement is RESOURCE_EXHAUSTED (checked before the
        outage mapping, which counts SQLSTATE class 57 as an outage). Read committed whatever
        the server's default: a page's statement must take its snapshot after PAGE_SETTINGS."""
        async with (
            outage_is_unavailable(operation),
            self._pool.acquire(timeout=self._acquire_timeout) as conn,
        ):
            try:
                async with conn.transaction(isolation="read_committed", readonly=True):
                    timeout = str(self._bounds.statement_timeout_ms)
                    # A SELECT of expressions only: exactly one row.
                    yield conn, (await conn.fetch(settings, timeout, *settings_args))[0]
            except asyncpg.QueryCanceledError as error:
                seconds = self._bounds.statement_timeout_ms / 1000
                raise ResourceExhausted(
                    f"the {operation} took longer than {seconds:g} s; {NARROW_HINT}"
                ) from error

    @asynccontextmanager
    async def reading(self, operation: str) -> AsyncIterator[asyncpg.Connection]:
        """A connection for another table's listing, under the same bounds and settings."""
        async with self._reading(operation) as (conn, _):
            yield conn

    async def scope(self, tenant: str, types: Sequence[str]) -> FieldScope:
        """The payload fields a filter may name (SchemaScopes.scope: cached on this replica,
        fresh as of the registry's change log)."""
        return await self._scopes.scope(tenant, types)

    async def page(
        self,
        selection: Selection,
        *,
        after_seq: int,
        limit: int,
        generation: int | None = None,
        position_field: str = "page_token",
    ) -> Page:
        """Up to `limit` settled matching events with seq > `after_seq`, in seq order, ending
        before the first one not settled yet (PAGING_GUARANTEE). `generation`: the retention
        generation of the token that continues at `after_seq` (None for no token); OUT_OF_RANGE
        (naming `position_field`) when the retention removed events past it since."""
        # One row beyond the page tells whether more follow without a second query.
        sql, args = page_sql(selection, after_seq=after_seq, limit=limit + 1)
        tenant = selection.tenant
        async with self._reading("query", PAGE_SETTINGS, tenant) as (conn, settings):
            records = await conn.fetch(sql, *args)
            if generation is not None:
                # After the rows: a removal they do not show anything of is seen here.
                horizon = await read_horizon(conn, tenant)
                refusal = fell_off(
                    horizon, after_seq=after_seq, generation=generation, field=position_field
                )
                if refusal is not None:
                    raise refusal
        page = settled_prefix([StoredRow(*record) for record in records], settings[2], limit)
        return Page(page.rows, page.more, int(settings[3]))

    async def feed_page(
        self, tenant: str, predicates: Sequence[Predicate], *, after_seq: int, limit: int
    ) -> tuple[Page, list[tuple[bool, ...]]]:
        """A live feed's round: up to `limit` settled events of `tenant` after `after_seq`
        (as `page`), and for each whether it matches each of `predicates`."""
        sql, args = feed_sql(tenant, predicates, after_seq=after_seq, limit=limit + 1)
        async with self._reading("query", PAGE_SETTINGS, tenant) as (conn, settings):
            records = await conn.fetch(sql, *args)
        width = len(StoredRow.__slots__)
        page = settled_prefix(
            [StoredRow(*record[:width]) for record in records], settings[2], limit
        )
        return page, [tuple(record[width:]) for record in records[: len(page.rows)]]

    async def settled_end(self, tenant: str) -> tuple[int, int]:
        """A seq at or below which every event of `tenant` that will ever commit has committed
        (the highest settled one; 0 for none): a tail from there misses nothing stored later;
        and the tenant's retention generation read before it (as Page.generation)."""
        # A row stored before the horizon leaves no lower seq in flight (PAGING_GUARANTEE), so
        # the highest such row is an end; the backward scan of (tenant, seq) reads the few
        # rows stored since the horizon before it finds one.
        statement = (
            "SELECT e.seq FROM events e WHERE e.tenant = $1 AND e.store_time < $2::timestamptz"
            " ORDER BY e.seq DESC LIMIT 1"
        )
        async with self._reading("query", PAGE_SETTINGS, tenant) as (conn, settings):
            found = await conn.fetchval(statement, tenant, settings[2])
        return 0 if found is None else int(found), int(settings[3])

    def _too_many(self, what: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"the {what} matches more than {self._bounds.max_rows:,} events; {NARROW_HINT}"
        )

    async def count(self, selection: Selection) -> int:
        """How many events match; RESOURCE_EXHAUSTED past `max_rows`."""
        sql, args = count_sql(selection, max_rows=self._bounds.max_rows)
        async with self._reading("count") as (conn, _):
            found = int(await conn.fetchval(sql, *args))
        if found > self._bounds.max_rows:
            raise self._too_many("count")
        return found

    async def aggregate(
        self,
        selection: Selection,
        *,
        group_by: GroupBy,
        field: Sequence[str] | None,
        max_groups: int,
    ) -> list[AggregateRow]:
        """Per group (largest first): events, and over the numbers at payload `field` their
        count, sum, min, max and average. RESOURCE_EXHAUSTED past `max_rows` events or
        `max_groups` groups."""
        sql, args = aggregate_sql(
            selection,
            group_by=group_by,
            field=field,
            max_rows=self._bounds.max_rows,
            max_groups=max_groups,
        )
        async with self._reading("aggregate") as (conn, _):
            records = await conn.fetch(sql, *args)
        if records and int(records[0][7]) > self._bounds.max_rows:
            raise self._too_many("aggregate")
        if len(records) > max_groups:
            raise ResourceExhausted(
                f"the aggregate makes more than {max_groups} groups; raise max_groups"
                f" (at most 1000), or {NARROW_HINT}"
            )
        return [
            AggregateRow(
                group=record[0],
                count=int(record[1]),
                value_count=int(record[2]),
                sum=_float(record[3]),
                min=_float(record[4]),
                max=_float(record[5]),
                avg=_float(record[6]),
            )
            for record in records
        ]
