"""Retention horizons (migration 0014): how far the retention removed each tenant's events,
so that a page or resume token whose position fell off the retention gets OUT_OF_RANGE, never
a page that silently continues past the removed events (the etcd watch rule).

Where storage learns the horizon: a table written by the retention in the transaction that
makes the events disappear (partitions.py: the DETACH of an expired partition, and each batch
DELETE of expired rows, in the same statement). Why a table and not something else:
- not the partition bounds (pg_inherits): a tenant's shorter retention deletes rows without
  dropping a partition, the default partition loses rows too, and a dropped partition leaves
  no trace to compare a token with;
- not the oldest stored seq of the tenant (min(seq)): seq does not follow ingest_time exactly
  (a lagging processor stores an old day's event after newer ones), so rows above a token's
  position can be removed while older ones stay; and a tenant whose events are all gone looks
  like one that never had any;
- not a time in the token compared with the settings' retention: the settings differ between
  replicas during a change, and what matters is what was removed, not what should have been.

The rule: a token carries the tenant's horizon generation read before the page that issued it
(`generation`); the next page, after reading its rows, reads the horizon again and refuses the
token when the generation moved (something was removed since) and the highest removed seq is
above the token's position (what was removed may have followed it). Why that finds every skip:
a removal R of a row above the position that commits after the issuing page read the
generation bumps it, and is seen by the read that follows the next page's rows, if R committed
before those rows were read (otherwise the rows still show the event and nothing is skipped
yet: the page after that one catches R). A removal before the issuing page cannot make the
client skip anything: what it removed was gone before the client was shown the page. A token
issued before this existed (no generation) counts as generation 0: refused once any removal
passed its position. Refusals without a skip are possible (a removal since the token, of rows
all at or below its position, while an older removal reached above it); restarting costs a
query, and a fresh query's token holds until the next removal (maintenance passes are hourly).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from services.storage.times import unix_micros
from streammesh.mesh.errors import OutOfRange

__all__ = [
    "GENERATION_SQL",
    "Horizon",
    "fell_off",
    "read_horizon",
    "record_removed_sql",
]

GENERATION_SQL = (
    "(SELECT coalesce(max(h.generation), 0) FROM retention_horizons AS h WHERE h.tenant = $2)"
)
"""A scalar subquery: the tenant's ($2) horizon generation, 0 without a removal."""

_UPSERT = (
    " ON CONFLICT (tenant) DO UPDATE SET"
    " generation = retention_horizons.generation + 1,"
    " removed_through_seq = greatest(retention_horizons.removed_through_seq,"
    " excluded.removed_through_seq),"
    " removed_before = greatest(retention_horizons.removed_before, excluded.removed_before),"
    " removed_at = now()"
)


def record_removed_sql(source: str, removed_before: str) -> str:
    """An INSERT that raises the horizon of every tenant in `source` (a query or CTE name with
    columns tenant and seq: the removed rows) to its highest seq; `removed_before` is the SQL of
    the ingest time before which the retention removes events."""
    return (
        "INSERT INTO retention_horizons"  # noqa: S608 (our own fragments)
        " (tenant, generation, removed_through_seq, removed_before)"
        f" SELECT r.tenant, 1, max(r.seq), {removed_before} FROM {source} AS r"
        f" GROUP BY r.tenant{_UPSERT}"
    )


@dataclass(frozen=True, slots=True)
class Horizon:
    """One tenant's: the generation, the highest seq removed, and (Unix microseconds) the
    ingest time before which events were removed and when the last removal ran."""

    generation: int
    removed_through_seq: int
    removed_before: int
    removed_at: int


async def read_horizon(conn: asyncpg.Connection, tenant: str) -> Horizon | None:
    """The tenant's horizon (None: the retention never removed any of its events); the
    connection exchanges timestamps as integers (services.storage.times)."""
    row = await conn.fetchrow(
        "SELECT generation, removed_through_seq, removed_before, removed_at"
        " FROM retention_horizons WHERE tenant = $1",
        tenant,
    )
    if row is None:
        return None
    return Horizon(int(row[0]), int(row[1]), unix_micros(row[2]), unix_micros(row[3]))


def _iso(unix_micros_value: int) -> str:
    moment = datetime.fromtimestamp(unix_micros_value / 1_000_000, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def fell_off(
    horizon: Horizon | None, *, after_seq: int, generation: int, field: str
) -> OutOfRange | None:
    """The refusal of a token at `after_seq` issued under `generation`, or None when it holds
    (module docstring)."""
    if horizon is None or horizon.generation <= generation:
        return None
    if horizon.removed_through_seq <= after_seq:
        return None
    if field == "resume_token":
        what = "subscribe again without resume_token, from a start time or from now"
    else:
        what = "repeat the request without page_token (a new query)"
    return OutOfRange(
        f"{field}: its position fell off the retention: this tenant's events ingested before"
        f" {_iso(horizon.removed_before)} were removed (last at {_iso(horizon.removed_at)}),"
        f" some of them after the token's position; continuing would skip them. To go on,"
        f" {what}.",
        field_violations=[(field, "position removed by the retention")],
    )
