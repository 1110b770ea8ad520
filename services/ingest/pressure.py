"""Back-pressure: refuse new batches while the queue is too far behind or Redis is too full.

A background task samples Redis every `sample_interval_seconds` in one pipelined round trip:
XINFO GROUPS for every partition and INFO memory. The request path only reads the cached sample
(a few dict lookups) and never waits for Redis. A batch is refused with RESOURCE_EXHAUSTED and
a RetryInfo delay in two cases:
- a partition it writes to holds `max_partition_lag` or more unacknowledged entries;
- Redis's used_memory has reached the memory limit (refuses every batch).

Lag measure (per partition, in stream entries: one entry = the events of one publish batch that
fall in that partition). It is the processor group's `lag` (entries not yet delivered) plus its
`pending` (delivered, not yet acknowledged), both read from XINFO GROUPS. On Redis 7 this costs
O(1) per stream. When Redis cannot compute `lag` (it answers nil after XDEL inside the
undelivered range, or after XGROUP SETID), the stream's length is used instead. That is an upper
bound, because trimming removes acknowledged entries. Entries are counted instead of events
because the event count would need the COUNT_FIELD of every unacknowledged entry, which is
O(lag) per sample. Memory is bounded by the second check.

A sample older than `stale_after_seconds` (Redis unreachable) is ignored: the batch is let
through, and the XADD then fails with UNAVAILABLE if Redis is really down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streammesh.mesh.errors import ResourceExhausted
from streammesh.mesh.tasks import raise_if_cancelled, stop_task, wait_event
from streammesh.streams import StreamLayout

__all__ = ["BackPressure", "PressureLimits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PressureLimits:
    """Thresholds and sampling for back-pressure."""

    max_partition_lag: int = 10_000
    """Unacknowledged entries per partition at which batches for it are refused; 0 = no limit."""
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


@dataclass(frozen=True)
class _Sample:
    taken: float
    lag: dict[int, int]
    used_memory: int
    memory_limit: int


class BackPressure:
    """Samples queue lag and Redis memory in the background; `check()` refuses from the cache."""

    def __init__(
        self, client: aioredis.Redis, layout: StreamLayout, limits: PressureLimits
    ) -> None:
        self._client = client
        self._layout = layout
        self._limits = limits
        self._sample: _Sample | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def sample_age(self) -> float | None:
        """Seconds since the last successful sample (None before the first)."""
        return None if self._sample is None else time.monotonic() - self._sample.taken

    def lag(self, partition: int) -> int | None:
        """The last sampled unacknowledged entries of `partition`."""
        return None if self._sample is None else self._sample.lag.get(partition)

    def check(self, partitions: Iterable[int]) -> None:
        """Raise ResourceExhausted if a batch writing to `partitions` must wait."""
        sample = self._sample
        limits = self._limits
        if sample is None or time.monotonic() - sample.taken > limits.stale_after_seconds:
            return
        if sample.memory_limit and sample.used_memory >= sample.memory_limit:
            raise ResourceExhausted(
                f"the event queue is full (Redis uses {sample.used_memory} of "
                f"{sample.memory_limit} bytes allowed); retry later",
                retry_after_seconds=limits.retry_after_seconds,
            )
        if limits.max_partition_lag:
            for partition in partitions:
                lag = sample.lag.get(partition, 0)
                if lag >= limits.max_partition_lag:
                    raise ResourceExhausted(
                        f"partition {partition} is {lag} batches behind (limit "
                        f"{limits.max_partition_lag}); retry later",
                        retry_after_seconds=limits.retry_after_seconds,
                    )

    async def sample(self) -> None:
        """Take one sample (one pipelined round trip)."""
        streams = self._layout.streams()
        async with self._client.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
                pipe.xlen(stream)
            pipe.info("memory")
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        lag = {}
        for partition in range(len(streams)):
            groups, length = replies[2 * partition], replies[2 * partition + 1]
            lag[partition] = self._unacknowledged(groups, length)
        memory = replies[-1]
        if isinstance(memory, Exception):
            raise memory
        limit = self._limits.max_memory_bytes
        if not limit and int(memory.get("maxmemory", 0)):
            limit = int(int(memory["maxmemory"]) * self._limits.memory_fraction)
        self._sample = _Sample(time.monotonic(), lag, int(memory["used_memory"]), limit)

    def _unacknowledged(self, groups: Any, length: Any) -> int:
        if isinstance(groups, Exception) or isinstance(length, Exception):
            return 0  # no stream yet: nothing queued
        for group in groups:
            name = group["name"]
            if (name.decode() if isinstance(name, bytes) else name) != self._layout.group:
                continue
            if group.get("lag") is None:
                return int(length)
            return int(group["lag"]) + int(group["pending"])
        return int(length)

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
