"""The check every fault test ends with, and a watcher of the queue while a fault is on.

Invariant: every acknowledged event is stored exactly once; an event that was never acknowledged
is stored at most once; nothing is stored that was not sent; and for every key the store order
(`seq`) is the publish order. The rows are read straight from the stack's storage schema.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.engine import make_url

from streammesh.backlog import Backlog, parse_backlog, queue_backlog_reads
from streammesh.cli.stack import StackConfig
from streammesh.mesh.tasks import raise_if_cancelled, stop_task
from streammesh.streams import StreamLayout
from tests.faults.load import LoadReport

__all__ = [
    "InvariantResult",
    "QueueWatcher",
    "check_invariant",
    "queue_drained",
    "queue_state",
    "stored_rows",
]


async def stored_rows(config: StackConfig, event_type: str) -> list[tuple[str, str, int]]:
    """(id, key, seq) of every stored event of `event_type`, in seq order."""
    url = make_url(config.database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database, timeout=10
    )
    try:
        rows = await conn.fetch(
            f'SELECT id, key, seq FROM "{config.db_schema_prefix}storage".events '  # noqa: S608
            "WHERE type = $1 ORDER BY seq",
            event_type,
        )
    finally:
        await conn.close()
    return [(row["id"], row["key"], row["seq"]) for row in rows]


async def queue_drained(client: aioredis.Redis, layout: StreamLayout) -> bool:
    """No partition has undelivered or unacknowledged entries for the processors' group.

    Delivered means the group's last-delivered id is the stream's last id. Redis's `lag` is not
    used: it is None whenever Redis cannot compute it (after an XDEL, and after some AOF
    reloads), which would read as "not drained" for good."""
    for stream in layout.streams():
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.xinfo_stream(stream)
                pipe.xinfo_groups(stream)
                info, groups = await pipe.execute()
        except RedisError:
            return False
        ours = [g for g in groups if g["name"] in (layout.group, layout.group.encode())]
        if not ours:
            return False  # nobody consumes this partition
        for group in ours:
            if int(group["pending"]) or group["last-delivered-id"] != info["last-generated-id"]:
                return False
    return True


async def queue_state(client: aioredis.Redis, layout: StreamLayout) -> str:
    """Per partition: length, last id, the group (XINFO GROUPS), the pending summary (XPENDING)
    and the backlog counters, for a failure message that explains itself."""
    lines = []
    for partition, stream in enumerate(layout.streams()):
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.xinfo_stream(stream)
                pipe.xinfo_groups(stream)
                pipe.xpending(stream, layout.group)
                pipe.hgetall(layout.unacked_key(partition))
                info, groups, pending, counters = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as error:
            lines.append(f"p{partition}: unreadable ({error})")
            continue
        if isinstance(info, Exception):
            lines.append(f"p{partition}: {info}")
            continue
        summary = (
            pending
            if isinstance(pending, Exception)
            else {
                "pending": pending["pending"],
                "min": pending["min"],
                "max": pending["max"],
                "consumers": [(c["name"], c["pending"]) for c in pending["consumers"]],
            }
        )
        lines.append(
            f"p{partition}: length {info['length']}, last id {info['last-generated-id']!r}, "
            f"groups {groups}, XPENDING {summary}, counters {counters}"
        )
    return "\n  ".join(lines)


@dataclass
class InvariantResult:
    acked: int
    stored: int
    stored_unacked: int
    missing: list[str]
    duplicates: list[str]
    foreign: list[str]
    order_violations: list[str]
    keys: int
    seconds_to_store: float
    """From the end of the load until every acknowledged event was stored."""

    def summary(self) -> dict[str, object]:
        return {
            "acked": self.acked,
            "stored": self.stored,
            "stored_unacked": self.stored_unacked,
            "missing": len(self.missing),
            "duplicates": len(self.duplicates),
            "order_violations": len(self.order_violations),
            "keys": self.keys,
            "seconds_to_store": round(self.seconds_to_store, 2),
        }


async def check_invariant(
    config: StackConfig,
    report: LoadReport,
    redis_client: aioredis.Redis,
    *,
    timeout: float = 45.0,
) -> InvariantResult:
    """Wait (bounded) until every acknowledged event is stored and the queue is drained, then
    assert the invariant; returns the figures for the test's report."""
    layout = StreamLayout(prefix=config.stream_prefix, partitions=config.partitions)
    started = time.monotonic()
    deadline = started + timeout
    rows: list[tuple[str, str, int]] = []
    while True:
        rows = await stored_rows(config, report.event_type)
        stored_ids = {row[0] for row in rows}
        if report.acked <= stored_ids and await queue_drained(redis_client, layout):
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    seconds_to_store = time.monotonic() - started
    # Re-read once more after a pause: a late redelivery would show up as a duplicate now.
    await asyncio.sleep(0.3)
    rows = await stored_rows(config, report.event_type)

    counts = Counter(row[0] for row in rows)
    stored_ids = set(counts)
    sent = report.sent
    result = InvariantResult(
        acked=len(report.acked),
        stored=len(stored_ids),
        stored_unacked=len(stored_ids - report.acked),
        missing=sorted(report.acked - stored_ids),
        duplicates=sorted(i for i, n in counts.items() if n > 1),
        foreign=sorted(stored_ids - sent),
        order_violations=_order_violations(report, rows),
        keys=len(report.order),
        seconds_to_store=seconds_to_store,
    )
    drained = await queue_drained(redis_client, layout)
    state = "" if drained else "; the queue:\n  " + await queue_state(redis_client, layout)
    assert report.acked, f"the load generator got no acknowledgement at all: {report.summary()}"
    assert not result.missing, (
        f"{len(result.missing)} acknowledged events never stored (after {timeout}s), e.g. "
        f"{result.missing[:5]}; queue drained: {drained}; {result.summary()}{state}"
    )
    assert not result.duplicates, f"stored twice: {result.duplicates[:5]}"
    assert not result.foreign, f"stored but never sent: {result.foreign[:5]}"
    assert not result.order_violations, (
        f"per-key order broken for {len(result.order_violations)} keys: "
        f"{result.order_violations[:3]}"
    )
    assert drained, (
        f"every acknowledged event is stored but the queue still holds entries after "
        f"{timeout}s{state}"
    )
    return result


def _order_violations(report: LoadReport, rows: list[tuple[str, str, int]]) -> list[str]:
    by_key: dict[str, list[str]] = {}
    for event_id, key, _seq in rows:  # rows are in seq order
        by_key.setdefault(key, []).append(event_id)
    broken = []
    for key, stored_order in by_key.items():
        stored = set(stored_order)
        published = [i for i in report.order.get(key, []) if i in stored]
        if stored_order != published:
            first = next(
                (
                    n
                    for n, (a, b) in enumerate(zip(stored_order, published, strict=False))
                    if a != b
                ),
                min(len(stored_order), len(published)),
            )
            broken.append(
                f"{key}: at position {first} stored {stored_order[first : first + 3]} "
                f"but published {published[first : first + 3]}"
            )
    return broken


@dataclass
class QueueSample:
    at: float
    lag: dict[int, int]
    length: dict[int, int]
    used_memory: int
    backlog: list[Backlog] = field(default_factory=list)
    """The backlog counters (unacknowledged events and bytes) per partition."""

    @property
    def unacked_events(self) -> int:
        return sum(b.events for b in self.backlog)

    @property
    def unacked_bytes(self) -> int:
        return sum(b.bytes for b in self.backlog)


@dataclass
class QueueWatcher:
    """Samples every partition's unacknowledged entries (group lag + pending, as ingest's
    back-pressure measures them), stream lengths and Redis used_memory, in the background.
    Samples that fail (Redis restarting) are skipped."""

    client: aioredis.Redis
    layout: StreamLayout
    interval: float = 0.05
    samples: list[QueueSample] = field(default_factory=list)
    failures: int = 0
    _task: asyncio.Task[None] | None = None

    @property
    def max_lag(self) -> int:
        return max((max(s.lag.values(), default=0) for s in self.samples), default=0)

    @property
    def max_length(self) -> int:
        return max((max(s.length.values(), default=0) for s in self.samples), default=0)

    @property
    def max_used_memory(self) -> int:
        return max((s.used_memory for s in self.samples), default=0)

    @property
    def max_unacked_events(self) -> int:
        return max((s.unacked_events for s in self.samples), default=0)

    @property
    def max_unacked_bytes(self) -> int:
        return max((s.unacked_bytes for s in self.samples), default=0)

    def between(self, start: float, end: float) -> list[QueueSample]:
        return [s for s in self.samples if start <= s.at <= end]

    async def sample(self) -> QueueSample:
        streams = self.layout.streams()
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
                pipe.xlen(stream)
            queue_backlog_reads(pipe, self.layout)
            pipe.info("memory")
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        lag, length = {}, {}
        for partition in range(len(streams)):
            groups, size = replies[2 * partition], replies[2 * partition + 1]
            if isinstance(groups, Exception) or isinstance(size, Exception):
                continue
            length[partition] = int(size)
            for group in groups:
                if group["name"] in (self.layout.group, self.layout.group.encode()):
                    undelivered = group.get("lag")
                    lag[partition] = int(group["pending"]) + (
                        int(size) if undelivered is None else int(undelivered)
                    )
        counters = replies[2 * len(streams) : -1]
        backlog = [] if any(isinstance(c, Exception) for c in counters) else parse_backlog(counters)
        memory = replies[-1]
        used = 0 if isinstance(memory, Exception) else int(memory["used_memory"])
        return QueueSample(time.monotonic(), lag, length, used, backlog)

    async def _run(self) -> None:
        while True:
            raise_if_cancelled()
            try:
                self.samples.append(await self.sample())
            except (RedisError, OSError):
                self.failures += 1
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            assert await stop_task(self._task), "the queue watcher did not stop"
            self._task = None
