"""Appending accepted batches to Redis Streams, and the durability this gives.

Ingest acknowledges a batch after XADD returned, that is, after Redis accepted every entry of it
into memory. What survives a failure then depends on Redis persistence:

- AOF with `appendfsync everysec` (the recommended default, as in compose/). A process crash of
  Redis loses nothing acknowledged, because the kernel still holds the writes. A power loss or
  kernel crash can lose up to about one second of acknowledged events.
- AOF with `appendfsync always`: nothing acknowledged is lost, even on power loss. Each write
  waits for an fsync, so it is slower.
- No AOF (RDB snapshots only, or no persistence, as on a developer machine): a Redis restart loses
  everything since the last snapshot. Fine for development, not for production.

Downstream, the processor acknowledges an entry only after storage committed it, with
PostgreSQL's `synchronous_commit = on` (its default), so a stored event survives any crash. The
idempotent insert keyed by event id turns re-delivery into exactly-once storage.

`IngestSettings.require_aof` makes ingest refuse to start unless AOF is on
(`check_durability`). It is off by default so that a development Redis without persistence works.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from services.ingest.pressure import BackPressure
from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import APPEND_SCRIPT
from streammesh.envelope import EnvelopeColumns
from streammesh.mesh.errors import Unavailable
from streammesh.mesh.startup import StartupError
from streammesh.mesh.tenancy import DEFAULT_TENANT
from streammesh.streams import COLUMNS_FIELD, StreamLayout

__all__ = ["DurabilityError", "StreamAppender", "check_durability"]

log = logging.getLogger(__name__)
# One encoder for all events: json.dumps with options builds a new encoder per call.
_json = json.JSONEncoder(separators=(",", ":")).encode


class DurabilityError(StartupError):
    """Redis does not persist what ingest would acknowledge, and the settings require it."""


async def check_durability(client: aioredis.Redis, *, require_aof: bool) -> str:
    """Report Redis persistence as text (for the log). If `require_aof` is set, raise
    DurabilityError when AOF is off.

    It reads INFO persistence (`aof_enabled`), which works even where CONFIG is disabled
    (managed Redis), and reads `appendfsync` when CONFIG GET is allowed.
    """
    info = await client.info("persistence")
    aof = bool(int(info.get("aof_enabled", 0)))
    try:
        fsync = (await client.config_get("appendfsync")).get("appendfsync", "unknown")
    except ResponseError:
        fsync = "unknown"
    mode = f"AOF on (appendfsync {fsync})" if aof else "AOF off"
    if require_aof and not aof:
        raise DurabilityError(
            "Redis has AOF off (appendonly no), so acknowledged events would be lost on a "
            "Redis restart; turn it on (CONFIG SET appendonly yes, and appendonly yes in "
            "redis.conf) or set STREAMMESH_INGEST_REQUIRE_AOF=false for development"
        )
    if aof and fsync == "no":
        log.warning("Redis appendfsync is 'no': the OS decides when acknowledged events hit disk")
    return mode


class StreamAppender:
    """Splits a batch by partition (keeping publish order inside each) and appends one entry per
    partition, or several when a partition's slice is larger than `max_entry_bytes`, in one
    pipelined round trip. Returns only after Redis accepted every entry. Each entry is appended
    with the backlog counters' APPEND_SCRIPT (streammesh/backlog.py): the XADD and the count of
    its events and bytes in one atomic step.

    With `pressure`, a batch is refused whole (ResourceExhausted) before anything is appended
    if it would take the unacknowledged events or bytes past a limit, or Redis is too full."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        pressure: BackPressure | None = None,
        *,
        max_entry_bytes: int = 1024 * 1024,
    ) -> None:
        self._client = client
        self._layout = layout
        self._pressure = pressure
        self._max_entry_bytes = max_entry_bytes

    async def append(
        self,
        events: Sequence[event_pb2.Event],
        envelope: EnvelopeColumns | None = None,
        *,
        producer: str,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        """Queue the validated events of `producer` in `tenant`; `envelope` is their columns as
        validation took them (read from the events when not given)."""
        now_ns = time.time_ns()
        if envelope is None:
            envelope = EnvelopeColumns(
                ids=[e.id for e in events],
                keys=[e.key for e in events],
                types=[e.type for e in events],
                content_types=[e.content_type for e in events],
                payloads=[e.payload for e in events],
                carriers=list(range(len(events))),
            )
        partition_for = self._layout.partition_for
        partitions = [partition_for(key) for key in envelope.keys]
        entries = self._entries(events, envelope, partitions, _Run(producer, tenant), now_ns)
        pressure = self._pressure
        if pressure is None:
            await self._append(entries)
            return
        weights: dict[int, tuple[int, int]] = {}
        for partition, serialized, count in entries:
            held = weights.get(partition, (0, 0))
            weights[partition] = (held[0] + count, held[1] + len(serialized))
        pressure.admit(weights)
        try:
            await self._append(entries)
        finally:
            pressure.settled(weights)

    async def _append(self, entries: list[tuple[int, bytes, int]]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for partition, serialized, count in entries:
                    # EVAL, not EVALSHA: redis-py checks a pipeline's scripts with an extra
                    # SCRIPT EXISTS round trip per execute, and EVALSHA alone fails with
                    # NOSCRIPT after a Redis restart. Redis caches the compiled script; the
                    # text is a few hundred bytes beside a batch of kilobytes.
                    pipe.eval(
                        APPEND_SCRIPT,
                        2,
                        self._layout.stream(partition),
                        self._layout.unacked_key(partition),
                        serialized,
                        count,
                        COLUMNS_FIELD,
                    )
                await pipe.execute()
        except (RedisError, OSError) as error:
            raise Unavailable(f"the event queue is unavailable ({type(error).__name__})") from error

    def _entries(
        self,
        events: Sequence[event_pb2.Event],
        envelope: EnvelopeColumns,
        partitions: list[int],
        run: _Run,
        now_ns: int,
    ) -> list[tuple[int, bytes, int]]:
        """The queue entries of a batch as (partition, serialized QueuedColumns, events), in
        append order: per partition, events keep publish order across entries. The columns
        are validation's; only the events that carry attributes or an event time are read
        again, and each partition's slice is picked out with C-level itemgetters."""
        # An event without its own time takes the ingest time, which is kept to the microsecond.
        ingest_micros = now_ns // 1000
        count = len(envelope.ids)
        event_times = [ingest_micros] * count
        event_nanos = [0] * count
        attributes = ["{}"] * count
        for index in envelope.carriers:
            event = events[index]
            if event.attributes:
                attributes[index] = _json(dict(event.attributes))
            if event.HasField("event_time"):
                stamp = event.event_time
                event_times[index] = stamp.seconds * 1_000_000 + stamp.nanos // 1000
                event_nanos[index] = stamp.nanos % 1000
        columns = _Columns(
            ids=envelope.ids,
            keys=envelope.keys,
            types=envelope.types,
            payloads=envelope.payloads,
            content_types=envelope.content_types,
            attributes=attributes,
            event_time_micros=event_times,
            event_time_nanos=event_nanos,
        )
        slices: dict[int, list[int]] = {}
        for index, partition in enumerate(partitions):
            slices.setdefault(partition, []).append(index)
        entries: list[tuple[int, bytes, int]] = []
        for partition, indexes in slices.items():
            picked = columns if len(slices) == 1 else columns.pick(indexes)
            self._add_entries(entries, partition, picked, ingest_micros, run)
        return entries

    def _add_entries(
        self,
        entries: list[tuple[int, bytes, int]],
        partition: int,
        columns: _Columns,
        ingest_micros: int,
        run: _Run,
    ) -> None:
        """One entry for the partition's slice, or several in order when it is larger than
        max_entry_bytes (halved until each fits or holds one event)."""
        count = len(columns.ids)
        serialized = event_pb2.QueuedColumns(
            ids=columns.ids,
            keys=columns.keys,
            types=columns.types,
            payloads=columns.payloads,
            content_types=columns.content_types,
            attributes=columns.attributes,
            event_time_micros=columns.event_time_micros,
            event_time_nanos=columns.event_time_nanos,
            ingest_time_micros=[ingest_micros],
            producers=[run.producer],
            run_lengths=[count],
            run_tenants=[run.tenant],
            partition=partition,
        ).SerializeToString()
        if len(serialized) <= self._max_entry_bytes or count == 1:
            entries.append((partition, serialized, count))
            return
        half = count // 2
        self._add_entries(entries, partition, columns.pick(range(half)), ingest_micros, run)
        self._add_entries(entries, partition, columns.pick(range(half, count)), ingest_micros, run)


@dataclass(frozen=True, slots=True)
class _Run:
    """What the events of one append share: the publisher and its tenant (one run)."""

    producer: str
    tenant: str


@dataclass(frozen=True, slots=True)
class _Columns:
    """A batch's per-event columns of QueuedColumns (ingest time and producer are the batch's)."""

    ids: Sequence[str]
    keys: Sequence[str]
    types: Sequence[str]
    payloads: Sequence[bytes]
    content_types: Sequence[str]
    attributes: Sequence[str]
    event_time_micros: Sequence[int]
    event_time_nanos: Sequence[int]

    def pick(self, indexes: Sequence[int]) -> _Columns:
        """The events at `indexes`, in that order."""
        if len(indexes) == 1:
            (only,) = indexes
            return _Columns(*([getattr(self, name)[only]] for name in _COLUMN_NAMES))
        get = operator.itemgetter(*indexes)
        return _Columns(*(get(getattr(self, name)) for name in _COLUMN_NAMES))


_COLUMN_NAMES = tuple(f.name for f in dataclasses.fields(_Columns))
