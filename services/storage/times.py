"""Timestamps between the API (google.protobuf.Timestamp, nanoseconds) and the event store.

The `events` table keeps an instant as a timestamptz, which Postgres holds as a 64-bit count of
microseconds since 2000-01-01T00:00:00Z, plus `event_time_nanos` (0..999), the nanoseconds below
event_time's microsecond. So every instant of the Timestamp range (0001-01-01T00:00:00Z to
9999-12-31T23:59:59.999999999Z) is stored exactly, and SQL readers still see a real timestamp.

Storage exchanges timestamptz values with Postgres as that microsecond count (`TIMESTAMPTZ_AS_INT`,
an asyncpg codec on its pool), never as `datetime`: asyncpg's datetime codec turns the first and
the last microsecond of the range into -infinity/infinity on the way in, and Python's datetime
cannot hold what Postgres may return (infinity, years past 9999). Integers are also cheaper.
"""

from __future__ import annotations

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp

from streammesh.envelope import MAX_SECONDS, MIN_SECONDS

__all__ = [
    "MAX_PG_MICROS",
    "MAX_TIMESTAMP",
    "MIN_PG_MICROS",
    "MIN_TIMESTAMP",
    "PG_EPOCH_SECONDS",
    "TimeBound",
    "pg_micros",
    "set_timestamp",
    "time_bound",
    "unix_micros",
    "use_integer_timestamps",
]

PG_EPOCH_SECONDS = 946_684_800
"""2000-01-01T00:00:00Z, Postgres' epoch, in Unix seconds."""
MIN_PG_MICROS = (MIN_SECONDS - PG_EPOCH_SECONDS) * 1_000_000
"""0001-01-01T00:00:00Z as a Postgres microsecond count."""
MAX_PG_MICROS = (MAX_SECONDS - PG_EPOCH_SECONDS) * 1_000_000 + 999_999
"""9999-12-31T23:59:59.999999Z as a Postgres microsecond count."""
MIN_TIMESTAMP = Timestamp(seconds=MIN_SECONDS, nanos=0)
"""The first instant a Timestamp can hold; -infinity and earlier rows render as this."""
MAX_TIMESTAMP = Timestamp(seconds=MAX_SECONDS, nanos=999_999_999)
"""The last instant a Timestamp can hold; infinity and later rows render as this."""

TimeBound = tuple[int, int]
"""An instant as the store compares it: (Postgres microseconds, nanoseconds below them)."""


def pg_micros(value: Timestamp) -> int:
    """The Postgres microsecond count of an in-range Timestamp; nanoseconds below a microsecond
    are cut (the caller keeps them in `event_time_nanos` where they matter)."""
    return (value.seconds - PG_EPOCH_SECONDS) * 1_000_000 + value.nanos // 1000


def time_bound(value: Timestamp) -> TimeBound:
    """An in-range Timestamp as (microseconds, nanoseconds below), exactly."""
    return pg_micros(value), value.nanos % 1000


def unix_micros(micros: int) -> int:
    """A Postgres microsecond count as microseconds since 1970-01-01T00:00:00Z."""
    return micros + PG_EPOCH_SECONDS * 1_000_000


def set_timestamp(target: Timestamp, micros: int, nanos: int = 0) -> bool:
    """Write a stored instant into `target`; False (and the nearest instant of the range) when
    the store holds one a Timestamp cannot: infinity, -infinity or a year past 9999, which only
    rows written by hand or by an older release can hold."""
    if micros > MAX_PG_MICROS:
        target.CopyFrom(MAX_TIMESTAMP)
        return False
    if micros < MIN_PG_MICROS:
        target.CopyFrom(MIN_TIMESTAMP)
        return False
    seconds, micro = divmod(micros, 1_000_000)
    target.seconds = seconds + PG_EPOCH_SECONDS
    target.nanos = micro * 1000 + min(max(nanos, 0), 999)
    return True


def _encode(micros: int) -> tuple[int]:
    return (micros,)


def _decode(value: tuple[int]) -> int:
    return value[0]


async def use_integer_timestamps(conn: asyncpg.Connection) -> None:
    """Exchange timestamptz as Postgres microsecond counts on this connection (both ways,
    infinity as the int64 extremes); the `init` of storage's pool."""
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", encoder=_encode, decoder=_decode, format="tuple"
    )
