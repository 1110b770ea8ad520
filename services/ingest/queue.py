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

import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import RedisError, ResponseError

from services.ingest.pressure import BackPressure
from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import APPEND_SCRIPT
from streammesh.mesh.errors import Unavailable
from streammesh.mesh.startup import StartupError
from streammesh.streams import StreamLayout
from streammesh.wire import length_delimited_field, varint_field

__all__ = ["DurabilityError", "StreamAppender", "check_durability"]

log = logging.getLogger(__name__)


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

    async def append(self, events: Sequence[event_pb2.Event], *, producer: str) -> None:
        ingest_time = Timestamp()
        ingest_time.GetCurrentTime()
        partitions = [self._layout.partition_for(event.key) for event in events]
        entries = self._entries(events, partitions, producer, ingest_time.SerializeToString())
        batches = [entry.serialized() for entry in entries]
        pressure = self._pressure
        if pressure is None:
            await self._append(entries, batches)
            return
        weights: dict[int, tuple[int, int]] = {}
        for entry, batch in zip(entries, batches, strict=True):
            held = weights.get(entry.partition, (0, 0))
            weights[entry.partition] = (held[0] + len(entry.events), held[1] + len(batch))
        pressure.admit(weights)
        try:
            await self._append(entries, batches)
        finally:
            pressure.settled(weights)

    async def _append(self, entries: list[_Entry], batches: list[bytes]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for entry, batch in zip(entries, batches, strict=True):
                    # EVAL, not EVALSHA: redis-py checks a pipeline's scripts with an extra
                    # SCRIPT EXISTS round trip per execute, and EVALSHA alone fails with
                    # NOSCRIPT after a Redis restart. Redis caches the compiled script; the
                    # text is a few hundred bytes beside a batch of kilobytes.
                    pipe.eval(
                        APPEND_SCRIPT,
                        2,
                        self._layout.stream(entry.partition),
                        self._layout.unacked_key(entry.partition),
                        batch,
                        len(entry.events),
                    )
                await pipe.execute()
        except (RedisError, OSError) as error:
            raise Unavailable(f"the event queue is unavailable ({type(error).__name__})") from error

    def _entries(
        self,
        events: Sequence[event_pb2.Event],
        partitions: list[int],
        producer: str,
        ingest_time: bytes,
    ) -> list[_Entry]:
        """The queue entries of a batch, in append order: per partition, events keep publish
        order across entries. Each event is framed into its QueuedEvent as bytes (the event as
        the client sent it, then the ingest time and producer, shared by the whole batch)
        rather than copied into a new message: the same QueuedBatch on the wire, at a third of
        the cost."""
        tail = length_delimited_field(2, ingest_time) + length_delimited_field(3, producer.encode())
        event_time = length_delimited_field(4, ingest_time)  # for events without their own
        entries: list[_Entry] = []
        open_entry: dict[int, _Entry] = {}
        for event, partition in zip(events, partitions, strict=True):
            body = event.SerializeToString()
            if not event.HasField("event_time"):
                body += event_time
            item = length_delimited_field(1, length_delimited_field(1, body) + tail)
            entry = open_entry.get(partition)
            if entry is None or (entry.size + len(item) > self._max_entry_bytes and entry.events):
                entry = open_entry[partition] = _Entry(partition)
                entries.append(entry)
            entry.add(item)
        return entries


class _Entry:
    """One queue entry being built: a QueuedBatch as its serialized `events` items."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.events: list[bytes] = []
        self.size = 0

    def add(self, item: bytes) -> None:
        self.events.append(item)
        self.size += len(item)

    def serialized(self) -> bytes:
        return b"".join(self.events) + varint_field(2, self.partition)
