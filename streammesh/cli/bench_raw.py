"""The raw path of `streammesh bench`: the pipeline's durable work done the best bare way we
know, as the baseline the mesh is measured against (mesh/raw).

One XADD per (publish batch, partition) with a column-wise entry (bench_columns); one consumer
task with its own Redis and Postgres connections per partition, XREADGROUP, consecutive entries
grouped up to MAX_GROUP_EVENTS events, one INSERT_BATCH or INSERT_BATCH_JOINED (storage's own
statements, chosen as storage chooses, from its public `services.storage.sql`, with the tenant of
every row, and storage's conflict check after an insert that skipped rows) per group into a
table made by storage's own migrations, timestamps bound
as integers, then XACK and XTRIM (the processor trims acknowledged entries too) sent with the next
read. Every command is packed before the measured window (`RawPath.prepare`), so during it the
bench process does only what a bare pipeline must: write the XADDs, read, decode, bind, insert,
acknowledge. When the mesh learns a trick, this path must have it too.

Redis is spoken directly: commands packed by hiredis, replies parsed by hiredis.Reader.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis

from services.storage.sql import (
    INSERT_BATCH,
    INSERT_BATCH_JOINED,
    PG_EPOCH_SECONDS,
    RECORD_CONFLICTS,
    RECORD_CONFLICTS_JOINED,
    event_store_ddl,
    use_integer_timestamps,
)
from streammesh.api.common.v1 import event_pb2
from streammesh.cli.bench_columns import RawEvent, decode_group, encode_entry, entry_events
from streammesh.cli.bench_load import (
    NUMBER_WIDTH,
    BenchError,
    connect_postgres,
    proc_cpu_seconds,
    together,
)
from streammesh.mesh.postgres import checked_identifier
from streammesh.mesh.tenancy import DEFAULT_TENANT
from streammesh.streams import StreamLayout

__all__ = [
    "MAX_GROUP_EVENTS",
    "RawPath",
    "RawResult",
    "RawTable",
    "RedisWire",
    "raw_batches",
    "storage_table",
]

_pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)
"""hiredis.pack_command (its stub types the argument as a 1-tuple)."""

READ_COUNT = 64
"""Entries per XREADGROUP (about 8,000 events at 1,000-event batches over 8 partitions)."""
MAX_GROUP_EVENTS = 2000
"""Events per INSERT at most: consecutive entries are grouped up to this."""
PIPELINE_BATCHES = 16
"""Publish batches per XADD round trip."""
MAX_LEAD_EVENTS = 50_000
"""How far the producer may run ahead of the store (keeps Redis memory small)."""


@dataclass(frozen=True)
class RawTable:
    """The table the raw path writes into and the statements it writes with."""

    ddl: Sequence[str]
    """Run in order on a fresh schema (on the search_path); makes a table `events`."""
    inserts: Mapping[bool, str]
    """The batch insert, by whether its text columns are bound joined (`texts_joinable`):
    parameters as storage's INSERT_BATCH, $12 (the tenants) only when `tenants`."""
    conflicts: Mapping[bool, str] | None
    """What runs after an insert that skipped rows (None: nothing)."""
    tenants: bool


def storage_table() -> RawTable:
    """Storage's own table and statements, as storage runs them (what the raw path measures)."""
    return RawTable(
        ddl=event_store_ddl(),
        inserts={True: INSERT_BATCH_JOINED, False: INSERT_BATCH},
        conflicts={True: RECORD_CONFLICTS_JOINED, False: RECORD_CONFLICTS},
        tenants=True,
    )


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
        await wire.call(("SELECT", parts.path.lstrip("/") or "0"))
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


def raw_batches(
    templates: Sequence[Sequence[event_pb2.Event]],
    batches: int,
    *,
    producer: str,
    tenant: str = DEFAULT_TENANT,
) -> Iterator[list[RawEvent]]:
    """`batches` publish batches made from the templates round-robin (as the mesh's load is),
    batch n's number stamped into each id's slot; event and ingest time = now, as ingest sets
    them for events that carry none; in `tenant`, as the mesh stores the bench user's events.
    Made one by one: only the packed commands are kept."""
    now_ns = time.time_ns()
    micros, nanos = (now_ns // 1000) - PG_EPOCH_SECONDS * 1_000_000, now_ns % 1000
    slot = "@" * NUMBER_WIDTH
    split = [[e.id.split(slot) for e in events] for events in templates]
    for n in range(batches):
        number = f"{n:0{NUMBER_WIDTH}d}"
        events = templates[n % len(templates)]
        yield (
            [
                RawEvent(
                    id=number.join(parts),
                    key=e.key,
                    type=e.type,
                    event_time=micros,
                    event_time_nanos=nanos,
                    payload=e.payload,
                    content_type=e.content_type,
                    attributes="{}",
                    ingest_time=micros,
                    producer=producer,
                    tenant=tenant,
                )
                for e, parts in zip(events, split[n % len(templates)], strict=True)
            ]
        )


@dataclass(frozen=True)
class RawResult:
    events: int
    batches: int
    entries: int
    inserts: int
    """INSERT statements (groups of consecutive entries)."""
    stored: int
    """Rows the INSERTs reported new."""
    counted: int
    """Distinct ids in the table afterwards."""
    seconds: float
    """From the first XADD until every partition's last event was stored and acknowledged."""
    prepare_seconds: float
    """Encoding and packing every command, before the window (not measured)."""
    backend_cpu_seconds: float | None
    """CPU of the raw path's own Postgres backends during the window (None when /proc does not
    show them, e.g. a server on another host): unlike the bench's `postgres` figure, which counts
    every process of the server, this leaves other tenants out (and the WAL writer too)."""

    @property
    def stored_eps(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Partition:
    """One consumer's own connections and what it must store."""

    stream: str
    index: int
    expected: int
    redis: RedisWire
    postgres: Any
    backend_pid: int = 0
    stored: int = 0
    inserts: int = 0
    read: bytes = field(default=b"", repr=False)


class RawPath:
    """A prepared raw run: table created, streams and group made, connections open, every XADD
    packed. `run()` is the measured window; `aclose()` drops nothing (the bench drops the schema)."""

    def __init__(self, layout: StreamLayout, table: RawTable) -> None:
        self._layout = layout
        self._table = table
        self._admin: RedisWire | None = None
        self._partitions: list[_Partition] = []
        self._chunks: list[tuple[bytes, int, int]] = []  # (packed XADDs, commands, events)
        self._events = self._batches = self._entries = 0
        self._prepare_seconds = 0.0

    @classmethod
    async def prepare(
        cls,
        *,
        redis_url: str,
        database_url: str,
        schema: str,
        layout: StreamLayout,
        batches: Iterable[Sequence[RawEvent]],
        table: RawTable | None = None,
    ) -> RawPath:
        """`table`: storage's own (default) or another to compare with."""
        started = time.perf_counter()
        raw = cls(layout, table or storage_table())
        try:
            await _create_table(database_url, checked_identifier(schema), raw._table.ddl)
            raw._admin = await RedisWire.connect(redis_url)
            for stream in layout.streams():
                await raw._admin.call(("DEL", stream))
                await raw._admin.call(("XGROUP", "CREATE", stream, layout.group, "0", "MKSTREAM"))
            expected = raw._encode(batches)
            for index, stream in enumerate(layout.streams()):
                conn = await connect_postgres(
                    database_url,
                    server_settings={"search_path": schema, "application_name": "bench-raw"},
                )
                await use_integer_timestamps(conn)
                part = _Partition(
                    stream, index, expected[index], await RedisWire.connect(redis_url), conn
                )
                part.read = _pack(("XREADGROUP", "GROUP", layout.group, f"raw-{index}", "COUNT",
                                   READ_COUNT, "BLOCK", 100, "STREAMS", stream, ">"))  # fmt: skip
                part.backend_pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
                raw._partitions.append(part)
        except BaseException:
            await raw.aclose()
            raise
        raw._prepare_seconds = time.perf_counter() - started
        return raw

    def _encode(self, batches: Iterable[Sequence[RawEvent]]) -> list[int]:
        """Pack every XADD, PIPELINE_BATCHES batches per write; events expected per partition."""
        layout, expected = self._layout, [0] * self._layout.partitions
        source = iter(batches)
        while chunk := list(itertools.islice(source, PIPELINE_BATCHES)):
            commands, events = [], 0
            for batch in chunk:
                parts: dict[int, list[RawEvent]] = {}
                for event in batch:
                    parts.setdefault(layout.partition_for(event.key), []).append(event)
                for partition, items in sorted(parts.items()):
                    commands.append(
                        _pack(("XADD", layout.stream(partition), "*", *encode_entry(items)))
                    )
                    expected[partition] += len(items)
                    events += len(items)
                self._batches += 1
            self._chunks.append((b"".join(commands), len(commands), events))
            self._entries += len(commands)
            self._events += events
        return expected

    async def run(self, timeout: float) -> RawResult:
        """The measured window: produce and consume until every event is stored (bounded)."""
        loop = asyncio.get_running_loop()
        progress = asyncio.Event()
        stored = [0]
        table = self._table
        backends_before = self._backend_cpu()
        started = loop.time()

        async def produce() -> None:
            assert self._admin is not None
            produced = 0
            for packed, commands, events in self._chunks:
                while produced - stored[0] > MAX_LEAD_EVENTS:
                    progress.clear()
                    await progress.wait()
                await self._admin.call_packed(packed, commands)
                produced += events

        async def consume(part: _Partition) -> None:
            acks: list[bytes] = []
            while part.stored < part.expected:
                replies = await part.redis.call_packed(b"".join([*acks, part.read]), len(acks) + 1)
                acks = []
                if not replies[-1]:
                    continue
                ((_, entries),) = replies[-1]
                # The mesh's processor also shares one INSERT among the small groups of several
                # partitions (services/processor/delivery/across.py). Here each partition has its own
                # consumer and the bench's closed loop keeps every read full (READ_COUNT entries,
                # groups at MAX_GROUP_EVENTS), so that trick would save nothing: it pays off only
                # when a round holds a few events per partition, as at the open loop's low rates.
                for group in _groups(entries):
                    statement, columns, tenants = decode_group([fields for _, fields in group])
                    joined = statement == INSERT_BATCH_JOINED
                    with_tenants = (tenants,) if table.tenants else ()
                    status = await part.postgres.execute(
                        table.inserts[joined], *columns, part.index, *with_tenants
                    )
                    new = int(status.rsplit(" ", 1)[1])
                    # skipped rows: storage checks them for conflicts
                    if new < len(columns[3]) and table.conflicts is not None:
                        await part.postgres.execute(
                            table.conflicts[joined], *columns, *with_tenants
                        )
                    part.stored += new
                    part.inserts += 1
                    stored[0] += new
                ids = [entry_id for entry_id, _ in entries]
                acks = [
                    _pack(("XACK", part.stream, self._layout.group, *ids)),
                    _pack(("XTRIM", part.stream, "MINID", "~", ids[-1])),
                ]
                progress.set()
            if acks:
                await part.redis.call_packed(b"".join(acks), len(acks))

        try:
            async with asyncio.timeout(timeout):
                await together(produce(), *(consume(p) for p in self._partitions))
        except TimeoutError as error:
            raise BenchError(
                f"raw path: only {stored[0]} of {self._events} events stored after {timeout:.0f}s"
            ) from error
        seconds = loop.time() - started
        backends_after = self._backend_cpu()
        counted = int(
            await self._partitions[0].postgres.fetchval("SELECT count(DISTINCT id) FROM events")
        )
        return RawResult(
            events=self._events,
            batches=self._batches,
            entries=self._entries,
            inserts=sum(p.inserts for p in self._partitions),
            stored=stored[0],
            counted=counted,
            seconds=seconds,
            prepare_seconds=self._prepare_seconds,
            backend_cpu_seconds=(
                None
                if backends_before is None or backends_after is None
                else backends_after - backends_before
            ),
        )

    def _backend_cpu(self) -> float | None:
        """CPU seconds so far of the consumers' Postgres backends, when this host runs them."""
        seconds = [proc_cpu_seconds(part.backend_pid) for part in self._partitions]
        return None if None in seconds else sum(s for s in seconds if s is not None)

    async def aclose(self) -> None:
        for part in self._partitions:
            await part.postgres.close()
            await part.redis.aclose()
        if self._admin is not None:
            await self._admin.aclose()


def _groups(entries: Sequence[Any]) -> list[list[Any]]:
    """Consecutive entries, cut before the one that would take a group past MAX_GROUP_EVENTS."""
    groups: list[list[Any]] = []
    size = MAX_GROUP_EVENTS
    for entry in entries:
        events = entry_events(entry[1])
        if size + events > MAX_GROUP_EVENTS:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += events
    return groups


async def _create_table(database_url: str, schema: str, ddl: Sequence[str]) -> None:
    """A fresh schema holding the `events` table `ddl` makes (storage's: its migrations,
    indexes included)."""
    conn = await connect_postgres(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        for statement in ddl:
            await conn.execute(statement)
    finally:
        await conn.close()
