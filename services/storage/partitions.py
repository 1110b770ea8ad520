"""Partition maintenance of `events` (partitioned by range of ingest_time, migration 0012): daily
partitions created ahead, and events past the retention removed without a long DELETE through
`events` (which would hold QueryEvents pages back: queries.py, PAGING_GUARANTEE).

One pass (`maintain`) does, under a session advisory lock so that one replica at a time works
(another replica's pass returns at once, `MaintenanceReport.ran` False):

- create: a daily partition (UTC days) for today and each of the next `days_ahead` days not yet
  covered, as a table of its own with the range as a CHECK, then ATTACHed (SHARE UPDATE
  EXCLUSIVE on `events`: inserts go on). An ingest_time no partition covers lands in
  `events_default`, so an insert never fails; a day whose rows already sit in the default
  partition is not created (ATTACH would refuse) and stays there, logged;
- drop: every partition whose range ends at or before now - `retention_days`: DETACHed (ACCESS
  EXCLUSIVE on `events` for an instant: taken with `lock_timeout_ms` and retried, so a write
  waits at most that long and none fails; QueryEvents pages wait too, as the paging horizon
  counts a lock asked for on `events`, granted or not), then its (tenant, id)s deleted from
  event_ids in batches of `batch_rows`, each its own transaction (deleting from the detached
  table as it goes, so an interrupted pass resumes), then the table dropped. Until its event_ids rows are gone a
  new event under one of its ids is still skipped as a duplicate: an id is never stored twice;
  A redelivery of an entry whose day was dropped lands in the default partition (its
  ingest_time has no partition any more) and is deleted there by the next pass;
- the default partition's rows past the retention, and the rows of a tenant whose own retention
  is shorter than the global one, deleted in the same batches straight from each partition (not
  through `events`: a DELETE of a partition takes no lock on `events`, so pages are not held).
  A tenant's retention cannot be longer than the global one (dropping a partition removes every
  tenant's rows): the settings refuse it.

Every removal raises the retention horizons of the tenants it removed events of, in the
transaction that removes them (the DETACH's, each batch DELETE's): services.storage.retention,
which refuses a token whose position the retention passed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from services.storage.retention import record_removed_sql

__all__ = [
    "DEFAULT_PARTITION",
    "MaintenanceReport",
    "PartitionPolicy",
    "maintain",
    "range_partitions",
    "run_maintenance",
]

log = logging.getLogger(__name__)

DEFAULT_PARTITION = "events_default"
"""The partition of migration 0012 that takes any ingest_time no daily partition covers."""


@dataclass(frozen=True, slots=True)
class PartitionPolicy:
    """What a maintenance pass keeps."""

    days_ahead: int = 3
    """Daily partitions created beyond today."""
    retention_days: int | None = None
    """Events older than this (by ingest_time) are removed; None keeps them."""
    tenant_retention_days: Mapping[str, int] = field(default_factory=dict)
    """Shorter retentions of single tenants (at most retention_days)."""
    batch_rows: int = 5000
    """Rows per delete statement (each its own transaction)."""
    lock_timeout_ms: int = 500
    """How long a DETACH or ATTACH waits for its lock on `events` before it is retried."""
    lock_attempts: int = 20
    """Tries of one DETACH or ATTACH before the pass leaves it to the next one."""


@dataclass(slots=True)
class MaintenanceReport:
    """What one pass did."""

    ran: bool = False
    """False when another session held the maintenance lock."""
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    deleted_rows: int = 0
    """Rows deleted by the default partition's and the tenants' retentions."""


@dataclass(frozen=True, slots=True)
class _Partition:
    name: str
    lower: datetime | None  # None: MINVALUE
    upper: datetime | None  # None: MAXVALUE

    @classmethod
    def read(cls, row: asyncpg.Record) -> _Partition:
        name, lower, upper = row
        return cls(name, _from_seconds(lower), _from_seconds(upper))


def _from_seconds(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


_DAY = timedelta(days=1)
# The bounds of every range partition of events as Unix seconds (NULL: MINVALUE/MAXVALUE).
# pg_get_expr prints them as literals in the session's time zone with their offset, so the
# cast back is exact; seconds, not timestamps, whatever timestamp codec the connection uses
# (storage's pool exchanges them as integers).
_PARTITIONS = r"""
SELECT c.relname,
       extract(epoch FROM (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                        'FROM \(''([^'']*)''\)'))[1]::timestamptz)::float8,
       extract(epoch FROM (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                        'TO \(''([^'']*)''\)'))[1]::timestamptz)::float8
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass AND c.relname <> $1
"""
# Tables a pass detached and did not finish dropping (it stopped in between).
_DETACHED = """
SELECT c.relname FROM pg_class AS c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'
  AND c.relname ~ '^events_p(_before_)?[0-9]{8}$' AND NOT c.relispartition
ORDER BY c.relname
"""
_LOCK_KEY = "SELECT hashtext(current_schema() || '.events partition maintenance')"


def _day_name(day: datetime) -> str:
    return f"events_p{day:%Y%m%d}"


async def range_partitions(conn: asyncpg.Connection) -> list[str]:
    """The names of the range partitions of `events` (all but the default one), by name."""
    return sorted(row[0] for row in await conn.fetch(_PARTITIONS, DEFAULT_PARTITION))


async def _with_lock_retries(
    conn: asyncpg.Connection, policy: PartitionPolicy, statement: str, *then: str
) -> bool:
    """Run a DDL statement that needs a lock on `events` (and the statements `then`, in the
    same transaction), waiting at most lock_timeout_ms each try, so writers queued behind it
    wait no longer than that; False if every try timed out."""
    for attempt in range(policy.lock_attempts):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(policy.lock_timeout_ms)}")
                await conn.execute(statement)
                for following in then:
                    await conn.execute(following)
            return True
        except asyncpg.LockNotAvailableError:
            await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
    log.warning("gave up for this pass, the lock was not free: %s", statement)
    return False


def _detached_horizons(name: str, removed_before: datetime) -> str:
    """The horizons of the tenants in the just-detached partition `name` (services.storage.
    retention): each tenant's highest seq, found by a skip scan of its (tenant, seq) index,
    a few index probes per tenant, so the DETACH's lock on `events` is held for no longer."""
    return (
        "WITH RECURSIVE tenants(tenant) AS ("  # noqa: S608 (our names)
        f"(SELECT tenant FROM {name} ORDER BY tenant LIMIT 1) UNION ALL"
        f" SELECT (SELECT t.tenant FROM {name} AS t WHERE t.tenant > tenants.tenant"
        " ORDER BY t.tenant LIMIT 1) FROM tenants WHERE tenants.tenant IS NOT NULL),"
        f" removed AS (SELECT tenants.tenant, (SELECT max(x.seq) FROM {name} AS x"
        " WHERE x.tenant = tenants.tenant) AS seq FROM tenants WHERE tenants.tenant IS NOT NULL) "
        + record_removed_sql("removed", f"'{removed_before.isoformat()}'::timestamptz")
    )


async def _create_ahead(
    conn: asyncpg.Connection, policy: PartitionPolicy, now: datetime, report: MaintenanceReport
) -> None:
    partitions = [_Partition.read(row) for row in await conn.fetch(_PARTITIONS, DEFAULT_PARTITION)]
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    for offset in range(policy.days_ahead + 1):
        start, end = today + offset * _DAY, today + (offset + 1) * _DAY
        if any(
            (p.lower is None or p.lower < end) and (p.upper is None or p.upper > start)
            for p in partitions
        ):
            continue  # covered, wholly or in part (the partition of the upgrade, 0012)
        name = _day_name(start)
        # A table of its own first: CREATE TABLE ... PARTITION OF would lock `events` ACCESS
        # EXCLUSIVE; ATTACH takes SHARE UPDATE EXCLUSIVE, and the CHECK spares it a scan.
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {name} (LIKE events INCLUDING DEFAULTS,"
            f" CHECK (ingest_time >= '{start.isoformat()}' AND ingest_time < '{end.isoformat()}'))"
        )
        try:
            attached = await _with_lock_retries(
                conn,
                policy,
                f"ALTER TABLE events ATTACH PARTITION {name}"
                f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')",
            )
        except asyncpg.CheckViolationError:
            log.warning(
                "partition %s not created: %s holds rows of that day, which stay there",
                name,
                DEFAULT_PARTITION,
            )
            await conn.execute(f"DROP TABLE {name}")
            continue
        if attached:
            report.created.append(name)
        else:  # the next pass tries again; an empty table must not pass for a detached one
            await conn.execute(f"DROP TABLE {name}")


async def _delete_batches(
    conn: asyncpg.Connection,
    table: str,
    where: str,
    args: list[object],
    batch_rows: int,
    *,
    removed_before: str | None,
) -> int:
    """Delete the rows of `table` (a partition, or a detached one) matching `where`, with their
    event_ids rows, `batch_rows` per statement (each its own transaction, so no long lock or
    snapshot); how many were deleted. `removed_before` (the SQL of an ingest time), for rows
    still in `events`: the same statement raises their tenants' retention horizons
    (services.storage.retention), so no reader sees them gone without the horizon."""
    horizon = ""
    if removed_before is not None:
        horizon = f", horizon AS ({record_removed_sql('gone', removed_before)})"
    statement = (
        f"WITH gone AS (DELETE FROM {table} WHERE ctid = ANY(ARRAY("  # noqa: S608 (our names)
        f"SELECT ctid FROM {table} WHERE {where} LIMIT ${len(args) + 1}))"
        " RETURNING tenant, id, seq),"
        " freed AS (DELETE FROM event_ids AS e USING gone AS g"
        f" WHERE e.tenant = g.tenant AND e.id = g.id AND e.seq = g.seq){horizon}"
        " SELECT count(*) FROM gone"
    )
    total = 0
    while deleted := await conn.fetchval(statement, *args, batch_rows):
        total += deleted
    return total


async def _drop_expired(
    conn: asyncpg.Connection, policy: PartitionPolicy, now: datetime, report: MaintenanceReport
) -> None:
    if policy.retention_days is not None:
        cutoff = now - policy.retention_days * _DAY
        for row in await conn.fetch(_PARTITIONS, DEFAULT_PARTITION):
            partition = _Partition.read(row)
            if partition.upper is not None and partition.upper <= cutoff:
                detach = f"ALTER TABLE events DETACH PARTITION {partition.name}"
                horizons = _detached_horizons(partition.name, partition.upper)
                if await _with_lock_retries(conn, policy, detach, horizons):
                    log.info("detached %s (ends %s)", partition.name, partition.upper)
    # Every detached table, this pass's and any an earlier pass left: free its ids, drop it.
    for name in [row[0] for row in await conn.fetch(_DETACHED)]:
        # Their horizons were raised with the DETACH: these rows left `events` then.
        await _delete_batches(conn, name, "true", [], policy.batch_rows, removed_before=None)
        await conn.execute(f"DROP TABLE {name}")
        report.dropped.append(name)
    if policy.retention_days is not None:
        cutoff = now - policy.retention_days * _DAY
        report.deleted_rows += await _delete_batches(
            conn,
            DEFAULT_PARTITION,
            "ingest_time < $1::text::timestamptz",
            [cutoff.isoformat()],
            policy.batch_rows,
            removed_before="$1::text::timestamptz",
        )


async def _tenant_retention(
    conn: asyncpg.Connection, policy: PartitionPolicy, now: datetime, report: MaintenanceReport
) -> None:
    partitions = [_Partition.read(row) for row in await conn.fetch(_PARTITIONS, DEFAULT_PARTITION)]
    for tenant, days in sorted(policy.tenant_retention_days.items()):
        cutoff = now - days * _DAY
        tables = [p.name for p in partitions if p.lower is None or p.lower < cutoff]
        for table in [*tables, DEFAULT_PARTITION]:
            report.deleted_rows += await _delete_batches(
                conn,
                table,
                "tenant = $1 AND ingest_time < $2::text::timestamptz",
                [tenant, cutoff.isoformat()],
                policy.batch_rows,
                removed_before="$2::text::timestamptz",
            )


async def maintain(
    conn: asyncpg.Connection, policy: PartitionPolicy, *, now: datetime | None = None
) -> MaintenanceReport:
    """One maintenance pass on the connection's schema (module docstring), unless another
    session runs one: create the days ahead, then drop and delete what is past the retention.
    `now` stands in for the clock in tests."""
    now = datetime.now(UTC) if now is None else now
    report = MaintenanceReport()
    key = await conn.fetchval(_LOCK_KEY)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        return report
    try:
        report.ran = True
        await _create_ahead(conn, policy, now, report)
        await _drop_expired(conn, policy, now, report)
        await _tenant_retention(conn, policy, now, report)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
    if report.created or report.dropped or report.deleted_rows:
        log.info(
            "partitions: created %s, dropped %s, %d rows past a retention deleted",
            report.created,
            report.dropped,
            report.deleted_rows,
        )
    return report


async def run_maintenance(
    pool: asyncpg.Pool, policy: PartitionPolicy, *, interval_seconds: float
) -> None:
    """Run `maintain` now and every `interval_seconds` until cancelled; a failed pass (the
    database away, say) is logged and the next one tries again: inserts never depend on it
    (the default partition takes any day not created yet)."""
    while True:
        try:
            async with pool.acquire() as conn:
                await maintain(conn, policy)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning(
                "partition maintenance failed, retried in %.0fs: %s", interval_seconds, error
            )
        await asyncio.sleep(interval_seconds)
