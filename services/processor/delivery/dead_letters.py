"""Dead letters: counting an entry's failed attempts, and setting a poison entry aside.

What counts. A failed store counts toward the entry's limit (`max_deliveries`) unless it is an
outage (`is_outage`: storage unreachable, UNAVAILABLE, DEADLINE_EXCEEDED, a refused connection,
...). Storage being down therefore never dead-letters anything: the partition waits. An entry
that does not decode, or that storage refuses for good (PermanentStoreError), is set aside at
its first failure.

Why our own counter. Redis's delivery counter (XPENDING's times_delivered) was checked against
Redis 7.0: XREADGROUP with an explicit id (re-reading our pending entries, which is how a failed
partition is retried) increments it for *every* entry the read returns, and so do XCLAIM and
XAUTOCLAIM without JUSTID. It therefore counts reads, not failures: every retry after an outage
raises it, and so does every retry of an older entry for the entries queued behind it, which
were never attempted. Counting on it would dead-letter healthy entries after an outage. So the
processor keeps its own count of failed attempts in Redis:

- `<prefix>:attempts:{<prefix>:p<n>}`: hash, entry id -> "<failures>:<first failure, Unix ms>".

FAIL increments it atomically; the fenced ACK script (ownership.py) deletes the entry's field in
the same step as the XACK, so the hash only holds entries that failed and are still pending. The
count lives in Redis, not in the process: it survives a crash and a handover to another owner.

Setting aside (in this order; the entry is acknowledged only after both):
1. the record goes to storage (StoreDeadLetter, idempotent on stream + entry id). If storage
   refuses the full record (say the batch is too large for a request), a record without the batch
   is tried; if storage cannot be reached, the entry stays pending and is retried, never
   acknowledged without its record;
2. a notification goes to the stream `<prefix>:dead`, capped with MAXLEN ~ (the table, not the
   stream, is the record).
A crash between the steps repeats them for the entry: the record is not duplicated, the
notification may be.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
import redis.asyncio as aioredis

from streammesh.api.common.v1 import event_pb2
from streammesh.streams import BATCH_FIELD, COLUMNS_FIELD, StreamLayout

__all__ = [
    "MAX_ERROR_CHARS",
    "MAX_RAW_BYTES",
    "Attempts",
    "DeadLetterRecord",
    "DeadLetterSink",
    "FailureCounter",
    "RecordDeadLetter",
    "StoreUnavailable",
    "attempts_key",
    "describe",
    "is_outage",
]

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
MAX_RAW_BYTES = 1024 * 1024
"""Raw fields of an undecodable entry kept in its record, at most (the rest is cut)."""


class StoreUnavailable(Exception):
    """Storage could not be reached or did not answer in time: the store may succeed later, and
    the failure never counts toward the dead-letter limit."""


# Statuses that say nothing about the entry: storage (or the path to it) is down, overloaded at
# the transport, or the call was cut short. Authentication and policy refusals belong here too:
# a misconfigured certificate must stall the pipeline, not dead-letter all of its traffic.
_OUTAGE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


def is_outage(error: BaseException) -> bool:
    """Whether a failed store says nothing about the entry (it never counts)."""
    if isinstance(error, StoreUnavailable | OSError):  # ConnectionError, TimeoutError included
        return True
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in _OUTAGE_CODES
    return False


def describe(error: BaseException) -> str:
    """A one-line, bounded, NUL-free description for logs and records."""
    if isinstance(error, grpc.aio.AioRpcError):
        text = f"{error.code().name}: {error.details()}"
    else:
        text = f"{type(error).__name__}: {error}"
    return text.replace("\x00", "\ufffd")[:MAX_ERROR_CHARS]


def attempts_key(layout: StreamLayout, partition: int) -> str:
    """The hash of failed-attempt counts of a partition's pending entries."""
    return layout.partition_key("attempts", partition)


@dataclass(frozen=True)
class Attempts:
    count: int
    """Failed attempts that counted, this one included."""
    first_failed_ms: int
    """Unix milliseconds of the first counted failure."""


_FAIL = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
local count, first = 0, ARGV[2]
if value then
  local sep = string.find(value, ':', 1, true)
  count = tonumber(string.sub(value, 1, sep - 1))
  first = string.sub(value, sep + 1)
end
count = count + 1
redis.call('HSET', KEYS[1], ARGV[1], count .. ':' .. first)
return {count, first}
"""


class FailureCounter:
    """Counts an entry's failed attempts in Redis (see the module doc)."""

    def __init__(self, client: aioredis.Redis, layout: StreamLayout) -> None:
        self._layout = layout
        self._fail = client.register_script(_FAIL)

    async def fail(self, partition: int, entry_id: bytes, now_ms: int) -> Attempts:
        """Count one more failed attempt of the entry."""
        reply: list[Any] = await self._fail(
            keys=[attempts_key(self._layout, partition)], args=[entry_id, now_ms]
        )
        return Attempts(count=int(reply[0]), first_failed_ms=int(reply[1]))


@dataclass(frozen=True)
class DeadLetterRecord:
    """What the processor records about an entry it sets aside."""

    stream: str
    partition: int
    entry_id: str
    batch: bytes | None
    """The serialized QueuedBatch; None when the entry did not decode (or was left out)."""
    raw_fields: tuple[tuple[bytes, bytes], ...]
    """The entry's fields when it did not decode (cut to MAX_RAW_BYTES)."""
    event_ids: tuple[str, ...]
    error: str
    delivery_count: int
    first_failed_at: dt.datetime
    last_failed_at: dt.datetime

    @classmethod
    def build(
        cls,
        *,
        stream: str,
        partition: int,
        entry_id: bytes,
        fields: dict[bytes, bytes] | None,
        batch: event_pb2.QueuedBatch | None,
        error: str,
        attempts: Attempts,
        now_ms: int,
    ) -> DeadLetterRecord:
        raw: tuple[tuple[bytes, bytes], ...] = ()
        if batch is None and fields:
            raw, cut = _bounded(fields)
            if cut:
                error = f"{error} (raw fields cut to {MAX_RAW_BYTES} bytes)"
        return cls(
            stream=stream,
            partition=partition,
            entry_id=entry_id.decode(),
            batch=_kept_batch(fields, batch),
            raw_fields=raw,
            event_ids=tuple(q.event.id for q in batch.events) if batch is not None else (),
            error=error,
            delivery_count=attempts.count,
            first_failed_at=_from_ms(attempts.first_failed_ms),
            last_failed_at=_from_ms(now_ms),
        )

    def without_body(self, why: str) -> DeadLetterRecord:
        """The same record without batch and raw fields (when storage refused it whole)."""
        note = f"{self.error}; the batch was not kept: {why}"[:MAX_ERROR_CHARS]
        return replace(self, batch=None, raw_fields=(), error=note)


RecordDeadLetter = Callable[[DeadLetterRecord], Awaitable[int]]
"""Stores a record (StoreDeadLetter) and returns its dead-letter id; raises when it could not."""


def _kept_batch(
    fields: dict[bytes, bytes] | None, batch: event_pb2.QueuedBatch | None
) -> bytes | None:
    """The serialized QueuedBatch a record keeps: the entry's own bytes, or, for a columnar
    entry, the QueuedBatch it decoded to (a dead letter has that one form)."""
    if batch is None or not fields:
        return None
    if COLUMNS_FIELD in fields:
        return batch.SerializeToString()
    return fields[BATCH_FIELD]


def _from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _bounded(fields: dict[bytes, bytes]) -> tuple[tuple[tuple[bytes, bytes], ...], bool]:
    kept: list[tuple[bytes, bytes]] = []
    budget, cut = MAX_RAW_BYTES, False
    for name, value in fields.items():
        room = max(budget - len(name), 0)
        if len(value) > room:
            value, cut = value[:room], True
        kept.append((name, value))
        budget -= len(name) + len(value)
    return tuple(kept), cut


class DeadLetterSink:
    """Records dead letters in storage, then notifies the capped dead-letter stream."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        record: RecordDeadLetter | None,
        *,
        stream_maxlen: int,
    ) -> None:
        self._client = client
        self._stream = layout.dead_letter_stream
        self._record = record
        self._maxlen = stream_maxlen

    @property
    def stream(self) -> str:
        return self._stream

    async def send(self, record: DeadLetterRecord) -> None:
        """Store the record, then notify; raises (nothing acknowledged) when storage could not
        take even a record without the batch. Without a recorder (tests, tools) the stream
        entry is the only record."""
        dead_letter_id = None
        if self._record is not None:
            dead_letter_id = await self._store(record)
        notification: dict[Any, Any] = {
            "stream": record.stream,
            "partition": record.partition,
            "entry_id": record.entry_id,
            "error": record.error,
            "deliveries": record.delivery_count,
        }
        if dead_letter_id is not None:
            notification["dead_letter_id"] = dead_letter_id
        if record.batch is not None:
            notification[BATCH_FIELD] = record.batch
        await self._client.xadd(self._stream, notification, maxlen=self._maxlen, approximate=True)

    async def _store(self, record: DeadLetterRecord) -> int:
        assert self._record is not None
        try:
            return await self._record(record)
        except Exception as error:
            if is_outage(error) or (record.batch is None and not record.raw_fields):
                raise
            why = describe(error)
            log.warning("storage refused dead letter %s in full (%s)", record.entry_id, why)
            return await self._record(record.without_body(why))
