"""Back-pressure: refuse new batches while the queue holds too many unacknowledged events or
bytes, or Redis is too full.

What is limited. The backlog counters (`streammesh/backlog.py`): per partition, the events and
the bytes (serialized batch) appended and not yet acknowledged by the processors, kept exactly
by ingest's append script and the processor's fenced ack. A batch is refused whole, before
anything of it is appended, with RESOURCE_EXHAUSTED and a RetryInfo delay, when taking it would
bring
- a partition it writes to past `max_partition_events` or `max_partition_bytes`, or
- the sum over all partitions past `max_events` or `max_bytes`,
(a batch larger than a limit on its own still goes into an empty queue, else it could never
go), or when Redis's used_memory has reached the memory limit (every batch is refused).

Cost. A background task reads the counters of every partition and INFO memory in one pipelined
round trip every `sample_interval_seconds`. The request path reads that cached sample and adds
the batch's own weight to it (`admit`), so the batches this replica admits between two samples
count at once, also while their XADD is still in flight: no Redis round trip and O(partitions
of the batch) per request. A batch whose XADD is in flight while a sample is taken may or may
not be in the sample's reply; it is counted anyway, so the figure can read high by the
replica's appends in flight, until the next sample: a refusal can come that early, an
admission past a limit cannot.

The bound this gives. Unacknowledged bytes stay below `max_bytes` plus what other ingest
replicas admit within one sample interval (their admissions show at the next sample), plus one
batch into an empty queue. Redis memory for the queue is then at most
    (max_bytes + partitions x (trim_after_bytes + one read)) x overhead
above Redis's own baseline: acknowledged entries stay until their partition is trimmed, which
the processor does after `trim_after_bytes` acknowledged bytes (default 2 MiB) or a read of
`read_count` entries more (services/processor/source/partitions.py); the overhead of a stream per batch
byte is at most 1.2 for entries of 2 kB or more (1.3 at 500 B; MEMORY USAGE, printed by
tests/ingest/test_backpressure.py). With the defaults (32 MiB, 8 partitions) and entries of
about 40 kB (a read of 32 is 1.3 MB; the bench's are about 30 kB) that is
(32 + 8 x 3.3) x 1.2 = 70 MiB.
The idempotency window (services/ingest/idempotency.py) adds a fixed term: its two hashes per
partition hold at most `idempotency_max_ids` ids (or two batches' slices, if larger), each at
most BYTES_PER_ID (80) bytes, whatever the rate or the number of tenants:
    partitions x max(idempotency_max_ids, 2 x max_batch_events) x 80 bytes
(8 x 100,000 x 80 = 61 MiB with the defaults; under a higher rate the window shrinks instead).
So the whole bound with the defaults is 70 + 61 = 131 MiB above the baseline.
`max_redis_memory_bytes` (or maxmemory) is the second line of defence for both. Retention
(`trim_retention_seconds`) keeps acknowledged entries on purpose and is outside this bound.

A sample older than `stale_after_seconds` (Redis unreachable) is ignored: the batch is let
through, and the XADD then fails with UNAVAILABLE if Redis is really down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streammesh.backlog import Backlog, parse_backlog, queue_backlog_reads
from streammesh.mesh.errors import ResourceExhausted
from streammesh.mesh.tasks import raise_if_cancelled, stop_task, wait_event
from streammesh.streams import StreamLayout

__all__ = ["BackPressure", "PressureLimits"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass(frozen=True)
class PressureLimits:
    """Thresholds and sampling for back-pressure; a limit of 0 is no limit."""

    max_events: int = 200_000
    """Unacknowledged events over all partitions."""
    max_bytes: int = 32 * MiB
    """Unacknowledged bytes (serialized batches) over all partitions."""
    max_partition_events: int = 100_000
    """Unacknowledged events of one partition."""
    max_partition_bytes: int = 16 * MiB
    """Unacknowledged bytes of one partition."""
    max_memory_bytes: int = 0
    """used_memory at which every batch is refused; 0 = `memory_fraction` of Redis maxmemory,
    or no limit when maxmemory is unset."""
    memory_fraction: float = 0.9
    """Share of Redis maxmemory used when max_memory_bytes is 0."""
    sample_interval_seconds: float = 0.2
    """How often Redis is sampled."""
    stale_after_seconds: float = 5.0
    """A sample older than this is ignored (fail open)."""
    retry_after_seconds: float = 1.0
    """The RetryInfo delay sent with RESOURCE_EXHAUSTED."""

    def describe(self) -> str:
        """The limits in words, for logs and the bench."""

        def limit(value: int, unit: str) -> str:
            return f"{value:,} {unit}" if value else f"no {unit} limit"

        return (
            f"unacknowledged at most {limit(self.max_events, 'events')} and "
            f"{limit(self.max_bytes, 'bytes')} in all, "
            f"{limit(self.max_partition_events, 'events')} and "
            f"{limit(self.max_partition_bytes, 'bytes')} per partition"
        )


@dataclass
class _Sample:
    taken: float
    partitions: list[list[int]]
    """[events, bytes] per partition: as read, plus what this replica admitted since."""
    events: int
    bytes: int
    used_memory: int
    memory_limit: int


class BackPressure:
    """Samples the backlog counters and Redis memory in the background; `admit()` refuses from
    the cache, or counts the batch into it."""

    def __init__(
        self, client: aioredis.Redis, layout: StreamLayout, limits: PressureLimits
    ) -> None:
        self._client = client
        self._layout = layout
        self._limits = limits
        self._sample: _Sample | None = None
        # Per partition, [events, bytes] admitted by this replica so far, and how much of that
        # has settled (its XADD returned or failed): what a sample cannot have seen yet.
        self._admitted = [[0, 0] for _ in range(layout.partitions)]
        self._settled = [[0, 0] for _ in range(layout.partitions)]
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def limits(self) -> PressureLimits:
        return self._limits

    @property
    def sample_age(self) -> float | None:
        """Seconds since the last successful sample (None before the first)."""
        return None if self._sample is None else time.monotonic() - self._sample.taken

    def backlog(self, partition: int) -> Backlog | None:
        """The partition's unacknowledged events and bytes as this replica sees them: the last
        sample plus its own admissions since."""
        if self._sample is None:
            return None
        events, size = self._sample.partitions[partition]
        return Backlog(events=events, bytes=size)

    def admit(self, weights: Mapping[int, tuple[int, int]]) -> None:
        """Raise ResourceExhausted if a batch of `weights` (partition -> (events, bytes)) must
        wait; else count it into the cached sample. Call `settled(weights)` once its XADD
        returned or failed."""
        self._check_admission(weights)
        for partition, (events, size) in weights.items():
            admitted = self._admitted[partition]
            admitted[0] += events
            admitted[1] += size
            if self._sample is not None:
                held = self._sample.partitions[partition]
                held[0] += events
                held[1] += size
                self._sample.events += events
                self._sample.bytes += size

    def settled(self, weights: Mapping[int, tuple[int, int]]) -> None:
        """The XADD of an admitted batch returned (or failed): a sample from now on sees it."""
        for partition, (events, size) in weights.items():
            done = self._settled[partition]
            done[0] += events
            done[1] += size

    def _check_admission(self, weights: Mapping[int, tuple[int, int]]) -> None:
        sample = self._sample
        limits = self._limits
        if sample is None or time.monotonic() - sample.taken > limits.stale_after_seconds:
            return
        if sample.memory_limit and sample.used_memory >= sample.memory_limit:
            raise self._refusal(
                f"the event queue is full (Redis uses {sample.used_memory:,} of "
                f"{sample.memory_limit:,} bytes allowed)"
            )
        events = sum(weight[0] for weight in weights.values())
        size = sum(weight[1] for weight in weights.values())
        self._check("the event queue", "in all", sample.events, events, limits.max_events)
        self._check("the event queue", "in all", sample.bytes, size, limits.max_bytes, "bytes")
        for partition, (part_events, part_bytes) in weights.items():
            held = sample.partitions[partition]
            name = f"partition {partition}"
            self._check(name, "per partition", held[0], part_events, limits.max_partition_events)
            self._check(
                name, "per partition", held[1], part_bytes, limits.max_partition_bytes, "bytes"
            )

    def _check(
        self, name: str, scope: str, held: int, adding: int, limit: int, unit: str = "events"
    ) -> None:
        # An empty queue takes any batch: one larger than the limit would never go otherwise.
        if limit and held > 0 and held + adding > limit:
            what = "bytes of unacknowledged events" if unit == "bytes" else "unacknowledged events"
            raise self._refusal(
                f"{name} holds {held:,} {what} and this batch adds {adding:,} {unit}, over the "
                f"limit of {limit:,} {unit} {scope}"
            )

    def _refusal(self, message: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"{message}; retry later", retry_after_seconds=self._limits.retry_after_seconds
        )

    async def sample(self) -> None:
        """Take one sample (one pipelined round trip). What this replica admitted and had not
        settled when the sample started is added to what Redis says: it may or may not be in
        the reply, so it is counted (twice at worst, until the next sample)."""
        settled = [list(done) for done in self._settled]
        async with self._client.pipeline(transaction=False) as pipe:
            queue_backlog_reads(pipe, self._layout)
            pipe.info("memory")
            replies: list[Any] = await pipe.execute()
        backlog = parse_backlog(replies[:-1])
        memory = replies[-1]
        limit = self._limits.max_memory_bytes
        if not limit and int(memory.get("maxmemory", 0)):
            limit = int(int(memory["maxmemory"]) * self._limits.memory_fraction)
        partitions = [
            [b.events + admitted[0] - done[0], b.bytes + admitted[1] - done[1]]
            for b, admitted, done in zip(backlog, self._admitted, settled, strict=True)
        ]
        self._sample = _Sample(
            taken=time.monotonic(),
            partitions=partitions,
            events=sum(p[0] for p in partitions),
            bytes=sum(p[1] for p in partitions),
            used_memory=int(memory["used_memory"]),
            memory_limit=limit,
        )

    async def run(self) -> None:
        """Sample until stop(); failures are logged and retried on the next tick."""
        while not self._stop.is_set():
            raise_if_cancelled()
            try:
                await self.sample()
            except (RedisError, OSError) as error:
                log.warning("back-pressure sample failed: %s", error)
            await wait_event(self._stop, self._limits.sample_interval_seconds)

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self.run(), name="ingest-backpressure")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
