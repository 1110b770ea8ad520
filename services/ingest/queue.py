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
from typing import Any

import redis.asyncio as aioredis
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError, ResponseError

from services.ingest.idempotency import (
    IdempotencyWindow,
    content_digests,
    id_fields,
    repeats_in_batch,
)
from services.ingest.pressure import BackPressure
from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import APPEND_SCRIPT, IDEMPOTENT_APPEND_SCRIPT, TRACE_FIELD
from streammesh.envelope import EnvelopeColumns
from streammesh.mesh.errors import Unavailable
from streammesh.mesh.startup import StartupError
from streammesh.mesh.tenancy import DEFAULT_TENANT
from streammesh.mesh.tracing import context_field, tracer, tracing_enabled
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

    With `window`, each partition's entries go in one IDEMPOTENT_APPEND_SCRIPT instead, which
    also checks and records the events' content digests (services/ingest/idempotency.py):
    events already accepted within the window are dropped and reported (duplicates and
    conflicts), and the rest of their partition is appended in a second call.

    With `pressure`, a batch is refused whole (ResourceExhausted) before anything is appended
    if it would take the unacknowledged events or bytes past a limit, or Redis is too full."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        pressure: BackPressure | None = None,
        *,
        max_entry_bytes: int = 1024 * 1024,
        window: IdempotencyWindow | None = None,
    ) -> None:
        self._client = client
        self._layout = layout
        self._pressure = pressure
        self._max_entry_bytes = max_entry_bytes
        self._window = window

    async def append(
        self,
        events: Sequence[event_pb2.Event],
        envelope: EnvelopeColumns | None = None,
        *,
        producer: str,
        tenant: str = DEFAULT_TENANT,
        guarded: bool = True,
    ) -> dict[int, int]:
        """Queue the validated events of `producer` in `tenant`; `envelope` is their columns as
        validation took them (read from the events when not given). Returns the events not
        queued because the window holds their id: index -> DUPLICATE or CONFLICT (empty
        without a window, or when not `guarded`: a dead-letter replay, queued whatever the
        window holds, and not recorded in it).

        While tracing is on, the append is a `publish` span (a child of the call's), and each
        entry carries that span's context in TRACE_FIELD when the span is sampled, for the
        processor's `process` span to link to. While it is off, neither costs anything."""
        if not tracing_enabled():
            return await self._queue(events, envelope, producer, tenant, guarded, "")
        with tracer().start_as_current_span(
            "publish",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.batch.message_count": len(events),
            },
        ) as span:
            context = (context_field() or "") if span.is_recording() else ""
            return await self._queue(events, envelope, producer, tenant, guarded, context)

    async def _queue(
        self,
        events: Sequence[event_pb2.Event],
        envelope: EnvelopeColumns | None,
        producer: str,
        tenant: str,
        guarded: bool,
        trace: str,
    ) -> dict[int, int]:
        """`append` with `trace` for TRACE_FIELD ("": none)."""
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
        slices: dict[int, list[int]] = {}
        for index, key in enumerate(envelope.keys):
            slices.setdefault(partition_for(key), []).append(index)
        # An event without its own time takes the ingest time, kept to the microsecond.
        ingest_micros = now_ns // 1000
        columns = _batch_columns(events, envelope, ingest_micros)
        run = _Run(producer, tenant, ingest_micros)
        window = self._window if guarded else None
        verdicts: dict[int, int] = {}
        digests: list[bytes] = []
        fields: list[bytes] = []
        if window is not None:
            digests = content_digests(events, envelope)
            fields = id_fields(tenant, envelope.ids)
            verdicts = repeats_in_batch(envelope.ids, digests)
            if verdicts:
                slices = {p: [i for i in kept if i not in verdicts] for p, kept in slices.items()}
        whole = len(slices) == 1 and not verdicts
        built = {
            partition: self._partition_entries(
                partition, columns if whole else columns.pick(kept), run
            )
            for partition, kept in slices.items()
            if kept
        }
        weights = {
            partition: (sum(count for _, count in items), sum(len(body) for body, _ in items))
            for partition, items in built.items()
        }
        pressure = self._pressure
        if pressure is not None:
            pressure.admit(weights)
        try:
            if window is None:
                await self._append(built, trace)
            else:
                guard = _Guard(window, fields, digests, slices, verdicts)
                while built:
                    replies = await self._append(built, trace, guard)
                    built = {
                        partition: self._partition_entries(partition, columns.pick(kept), run)
                        for partition, kept in guard.settle(replies).items()
                    }
        finally:
            if pressure is not None:
                pressure.settled(weights)
        return verdicts

    async def _append(
        self, built: dict[int, list[tuple[bytes, int]]], trace: str, guard: _Guard | None = None
    ) -> dict[int, Any]:
        """Run each partition's script in one pipeline; the replies by partition. Each entry
        carries `trace` in TRACE_FIELD unless it is empty."""
        layout = self._layout
        traced = (TRACE_FIELD, trace) if trace else ()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for partition, items in built.items():
                    stream = layout.stream(partition)
                    # EVAL, not EVALSHA: redis-py checks a pipeline's scripts with an extra
                    # SCRIPT EXISTS round trip per execute, and EVALSHA alone fails with
                    # NOSCRIPT after a Redis restart. Redis caches the compiled script; the
                    # text is a few hundred bytes beside a batch of kilobytes.
                    if guard is None:
                        for serialized, count in items:
                            pipe.eval(
                                APPEND_SCRIPT,
                                2,
                                stream,
                                layout.unacked_key(partition),
                                serialized,
                                count,
                                COLUMNS_FIELD,
                                *traced,
                            )
                        continue
                    window = guard.window
                    current, previous = window.keys(layout, partition)
                    bodies: list[bytes | int] = [part for item in items for part in item]
                    fields, digests = guard.arguments(partition)
                    pipe.eval(
                        IDEMPOTENT_APPEND_SCRIPT,
                        4,
                        stream,
                        layout.unacked_key(partition),
                        current,
                        previous,
                        COLUMNS_FIELD,
                        window.seconds,
                        window.hash_ids,
                        fields,
                        digests,
                        trace,
                        *bodies,
                    )
                replies = await pipe.execute()
        except (RedisError, OSError) as error:
            raise Unavailable(f"the event queue is unavailable ({type(error).__name__})") from error
        if guard is None:
            return {}
        return dict(zip(built, replies, strict=True))

    def _partition_entries(
        self, partition: int, columns: _Columns, run: _Run
    ) -> list[tuple[bytes, int]]:
        """One partition's events as entries (serialized QueuedColumns, events), in append
        order: one, or several in order when it is larger than max_entry_bytes (halved until
        each fits or holds one event)."""
        entries: list[tuple[bytes, int]] = []
        self._add_entries(entries, partition, columns, run)
        return entries

    def _add_entries(
        self, entries: list[tuple[bytes, int]], partition: int, columns: _Columns, run: _Run
    ) -> None:
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
            ingest_time_micros=[run.ingest_micros],
            producers=[run.producer],
            run_lengths=[count],
            run_tenants=[run.tenant],
            partition=partition,
        ).SerializeToString()
        if len(serialized) <= self._max_entry_bytes or count == 1:
            entries.append((serialized, count))
            return
        half = count // 2
        self._add_entries(entries, partition, columns.pick(range(half)), run)
        self._add_entries(entries, partition, columns.pick(range(half, count)), run)


def _batch_columns(
    events: Sequence[event_pb2.Event], envelope: EnvelopeColumns, ingest_micros: int
) -> _Columns:
    """The batch's per-event columns of QueuedColumns. They are validation's; only the events
    that carry attributes or an event time are read again."""
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
    return _Columns(
        ids=envelope.ids,
        keys=envelope.keys,
        types=envelope.types,
        payloads=envelope.payloads,
        content_types=envelope.content_types,
        attributes=attributes,
        event_time_micros=event_times,
        event_time_nanos=event_nanos,
    )


class _Guard:
    """One batch's way through the idempotency window: the id fields and digests of each
    partition's remaining events, and the verdicts so far (batch index -> verdict)."""

    def __init__(
        self,
        window: IdempotencyWindow,
        fields: list[bytes],
        digests: list[bytes],
        slices: dict[int, list[int]],
        verdicts: dict[int, int],
    ) -> None:
        self.window = window
        self._fields = fields
        self._digests = digests
        self._slices = slices
        self.verdicts = verdicts

    def arguments(self, partition: int) -> tuple[bytes, bytes]:
        """The partition's remaining id fields and their digests, each concatenated (both
        fixed-size, so the script cuts them apart by length)."""
        kept = self._slices[partition]
        fields, digests = self._fields, self._digests
        if len(kept) == len(fields):  # the whole batch is in this partition
            return b"".join(fields), b"".join(digests)
        return b"".join([fields[i] for i in kept]), b"".join([digests[i] for i in kept])

    def settle(self, replies: dict[int, Any]) -> dict[int, list[int]]:
        """Record the verdicts of the replies that appended nothing; the partitions to try
        again, with the events left (none when all of a partition's were seen)."""
        again: dict[int, list[int]] = {}
        for partition, reply in replies.items():
            if not isinstance(reply, list):
                continue  # appended
            kept = self._slices[partition]
            for at in range(0, len(reply), 2):
                self.verdicts[kept[int(reply[at])]] = int(reply[at + 1])
            left = [i for i in kept if i not in self.verdicts]
            self._slices[partition] = left
            if left:
                again[partition] = left
        return again


@dataclass(frozen=True, slots=True)
class _Run:
    """What the events of one append share: the publisher, its tenant and the ingest time."""

    producer: str
    tenant: str
    ingest_micros: int


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
