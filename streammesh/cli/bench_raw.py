"""The raw path of `streammesh bench`: the pipeline's job done by one bare asyncio task, no gRPC.

Same queue format as the real path (one Redis Stream entry per batch per partition, holding a
serialized QueuedBatch; see streammesh/streams.py), same table (the storage migrations run in a
bench-owned schema) and the same idempotent unnest INSERT ... ON CONFLICT as storage. Redis is
spoken directly: commands packed by hiredis and written on a plain asyncio connection, replies
parsed by hiredis.Reader (redis-py costs ~27 us of client CPU per pipelined XADD, this ~3 us).
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis

from services.storage.store import INSERT_BATCH
from services.storage.times import pg_micros, use_integer_timestamps
from streammesh.api.common.v1 import event_pb2
from streammesh.cli.bench_load import BatchTemplate, BenchError, connect_postgres, together
from streammesh.mesh.postgres import checked_identifier, load_migrations
from streammesh.streams import BATCH_FIELD, COUNT_FIELD, StreamLayout

__all__ = ["RawResult", "partition_templates", "run_raw"]

_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)
"""hiredis.pack_command (its stub types the argument as a 1-tuple)."""

READ_COUNT = 32
"""Entries per partition per XREADGROUP, as the processor reads."""
PIPELINE_BATCHES = 16
"""Publish batches per XADD round trip."""
MAX_LEAD_EVENTS = 50_000
"""How far the producer may run ahead of the store (keeps Redis memory small)."""
POOL_SIZE = 10
"""Postgres connections, as storage's default pool."""


class RedisWire:
    """A minimal RESP client: packed commands out, hiredis-parsed replies in, in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()

    @classmethod
    async def connect(cls, url: str) -> RedisWire:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise BenchError(f"the raw path speaks plain redis:// only, not {parts.scheme}://")
        reader, writer = await asyncio.open_connection(
            parts.hostname or "127.0.0.1", parts.port or 6379
        )
        wire = cls(reader, writer)
        if parts.password:
            user = unquote(parts.username) if parts.username else None
            auth = (
                ("AUTH", user, unquote(parts.password))
                if user
                else ("AUTH", unquote(parts.password))
            )
            await wire.call(auth)
        database = parts.path.lstrip("/") or "0"
        await wire.call(("SELECT", database))
        return wire

    async def call(self, command: Sequence[str | bytes | int]) -> Any:
        return (await self.call_packed(_pack(tuple(command)), 1))[0]

    async def call_packed(self, packed: bytes, replies: int) -> list[Any]:
        self._writer.write(packed)
        out: list[Any] = []
        while len(out) < replies:
            reply = self._parser.gets()
            if reply is False:
                data = await self._reader.read(1 << 16)
                if not data:
                    raise BenchError("Redis closed the connection")
                self._parser.feed(data)
            elif isinstance(reply, hiredis.ReplyError):
                raise BenchError(f"Redis refused a raw-path command: {reply}")
            else:
                out.append(reply)
        return out

    async def aclose(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


def partition_templates(
    batches: Sequence[Sequence[event_pb2.Event]], layout: StreamLayout, *, producer: str
) -> list[list[tuple[int, BatchTemplate]]]:
    """Per publish batch, one QueuedBatch template per partition its keys fall in, built as
    ingest builds them (publish order kept, ingest_time = event_time = build time)."""
    now = event_pb2.QueuedEvent().ingest_time
    now.GetCurrentTime()
    out = []
    for events in batches:
        queued: dict[int, event_pb2.QueuedBatch] = {}
        for event in events:
            partition = layout.partition_for(event.key)
            batch = queued.setdefault(partition, event_pb2.QueuedBatch(partition=partition))
            item = batch.events.add(producer=producer)
            item.event.CopyFrom(event)
            item.event.event_time.CopyFrom(now)
            item.ingest_time.CopyFrom(now)
        out.append(
            [
                (p, BatchTemplate.split(b.SerializeToString(), len(b.events)))
                for p, b in sorted(queued.items())
            ]
        )
    return out


async def _create_table(database_url: str, schema: str) -> None:
    """A fresh schema holding storage's own `events` table (its migrations, indexes included)."""
    checked_identifier(schema)
    conn = await connect_postgres(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        for migration in load_migrations("services.storage.migrations"):
            await conn.execute(migration.sql)
    finally:
        await conn.close()


@dataclass(frozen=True)
class RawResult:
    events: int
    batches: int
    entries: int
    stored: int
    """Rows the INSERTs reported new."""
    counted: int
    """Rows in the table afterwards (count(*))."""
    seconds: float
    cpu_seconds: float
    """This process's CPU while the raw path ran (producer, consumer and the asyncpg client)."""

    @property
    def stored_eps(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0


class _Store:
    """Decode and insert, as storage does: the consumer half of the raw path."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._json = json.JSONEncoder(separators=(",", ":")).encode
        self.stored = 0

    async def partition(self, stream: bytes, entries: list[Any]) -> list[bytes]:
        """Store a partition's entries in order; returns their ids, to acknowledge."""
        ids = []
        for entry_id, fields in entries:
            data = dict(zip(fields[::2], fields[1::2], strict=True))
            batch = event_pb2.QueuedBatch.FromString(data[BATCH_FIELD])
            items = list(batch.events)
            events = [item.event for item in items]
            async with self._pool.acquire() as conn:
                status = await conn.execute(
                    INSERT_BATCH,
                    [e.id for e in events],
                    [e.key for e in events],
                    [e.type for e in events],
                    [pg_micros(e.event_time) for e in events],
                    [e.event_time.nanos % 1000 for e in events],
                    [e.payload for e in events],
                    [e.content_type for e in events],
                    [self._json(dict(e.attributes)) if e.attributes else "{}" for e in events],
                    [pg_micros(item.ingest_time) for item in items],
                    [item.producer for item in items],
                    batch.partition,
                )
            self.stored += int(status.rsplit(" ", 1)[1])
            ids.append(entry_id)
        return ids


async def run_raw(
    *,
    redis_url: str,
    database_url: str,
    schema: str,
    layout: StreamLayout,
    templates: Sequence[Sequence[tuple[int, BatchTemplate]]],
    batches: int,
    timeout: float,
) -> RawResult:
    """XADD `batches` publish batches (one entry per partition each) while one consumer reads
    them with XREADGROUP, inserts each entry with storage's statement and XACKs; timed from the
    first XADD until every event is stored."""
    await _create_table(database_url, schema)
    admin = await RedisWire.connect(redis_url)
    for stream in layout.streams():
        await admin.call(("DEL", stream))
        await admin.call(("XGROUP", "CREATE", stream, layout.group, "0", "MKSTREAM"))
    events = sum(t.events for n in range(batches) for _, t in templates[n % len(templates)])
    consumer = await RedisWire.connect(redis_url)
    pool = await connect_postgres(
        database_url,
        pool=True,
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        server_settings={"search_path": schema, "application_name": "streammesh-bench-raw"},
        init=use_integer_timestamps,
    )
    store = _Store(pool)
    loop = asyncio.get_running_loop()
    progress = asyncio.Event()
    cpu_start = _own_cpu()
    started = loop.time()
    deadline = started + timeout

    async def produce() -> None:
        produced = 0
        for first in range(0, batches, PIPELINE_BATCHES):
            while produced - store.stored > MAX_LEAD_EVENTS and loop.time() < deadline:
                progress.clear()
                await asyncio.wait_for(progress.wait(), timeout=max(0.01, deadline - loop.time()))
            commands = []
            for n in range(first, min(batches, first + PIPELINE_BATCHES)):
                for partition, template in templates[n % len(templates)]:
                    commands.append(
                        _pack(
                            (
                                "XADD",
                                layout.stream(partition),
                                "*",
                                BATCH_FIELD,
                                template.stamp(n),
                                COUNT_FIELD,
                                template.events,
                            )
                        )
                    )
                    produced += template.events
            await admin.call_packed(b"".join(commands), len(commands))

    async def consume() -> None:
        streams = layout.streams()
        read = _pack(
            (
                "XREADGROUP",
                "GROUP",
                layout.group,
                "raw",
                "COUNT",
                READ_COUNT,
                "BLOCK",
                100,
                "STREAMS",
                *streams,
                *([">"] * len(streams)),
            )
        )
        while store.stored < events and loop.time() < deadline:
            (reply,) = await consumer.call_packed(read, 1)
            if not reply:
                continue
            # Partitions concurrently, each in order: as the processor does.
            acked = await together(*(store.partition(s, entries) for s, entries in reply))
            acks = [
                _pack(("XACK", stream, layout.group, *ids))
                for (stream, _), ids in zip(reply, acked, strict=True)
            ]
            await consumer.call_packed(b"".join(acks), len(acks))
            progress.set()

    try:
        try:
            async with asyncio.timeout(timeout):
                await together(produce(), consume())
        except TimeoutError as error:
            raise BenchError(
                f"raw path: only {store.stored} of {events} events stored after {timeout:.0f}s"
            ) from error
        seconds = loop.time() - started
        cpu = _own_cpu() - cpu_start
        counted = int(await pool.fetchval("SELECT count(*) FROM events"))
    finally:
        await pool.close()
        await consumer.aclose()
        await admin.aclose()
    if store.stored < events:
        raise BenchError(f"raw path: only {store.stored} of {events} events stored")
    entries = sum(len(templates[n % len(templates)]) for n in range(batches))
    return RawResult(events, batches, entries, store.stored, counted, seconds, cpu)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
