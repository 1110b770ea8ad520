"""The consumer loop: store the batches of the partitions this processor owns, then XACK.

The worker wires the two parts and runs their rounds:
- the source (`source/`) owns partitions (leases), reads, reclaims, trims, and acknowledges
  only under its lease (fenced);
- delivery (`delivery/`) groups what a round read into StoreEvents calls, stores it, sets poison
  entries aside, and acknowledges through the source's fence.

Guarantees:
- An entry is acknowledged only after storage confirmed the batch (committed, or already there).
  A crash at any point therefore leads to re-delivery, and the idempotent store turns re-delivery
  into effectively-once.
- Per-key order: a partition is worked on by its lease holder only (`source/ownership.py`). Its
  entries are stored one after another in ID order. A failure stops the partition's round, and
  the retry starts again from its oldest pending entry, so a later batch never overtakes an
  earlier one, within one processor or across a handover.
- Poison: a failed store that is not an outage counts toward the entry's limit
  (`max_deliveries`); at the limit the entry is recorded as a dead letter in storage and then
  acknowledged, so the entries behind it flow. Outages never count
  (`delivery/dead_letters.py`).
- With the engine on (`engine=`), delivery acknowledges through the engine's committer
  (`processing/committer.py`): stored entries are processed by their partition's engine, its
  outputs stored fenced by the lease epoch, and an entry is acknowledged only once a saved
  checkpoint covers it (docs/processor-checkpoints.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.processor.delivery.dead_letters import RecordDeadLetter, attempts_key
from services.processor.delivery.deliverer import (
    Deliverer,
    DeliveryConfig,
    DeliveryStats,
    Outcome,
)
from services.processor.delivery.store import StoreBatch
from services.processor.processing.committer import (
    Definitions,
    EngineCommitter,
    EngineConfig,
    EngineStore,
)
from services.processor.source.ownership import PartitionOwnership
from services.processor.source.partitions import (
    PartitionSource,
    SourceConfig,
    SourceStats,
    partition_status,
)
from streammesh.api.processor.v1 import processor_pb2
from streammesh.mesh.tasks import raise_if_cancelled, stop_task, wait_event
from streammesh.streams import StreamLayout

__all__ = ["EngineSetup", "StreamWorker", "WorkerConfig", "WorkerStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig(SourceConfig, DeliveryConfig):
    """Both parts' settings, flat (each field is the processor setting of the same name), and
    the pause after a failed round."""

    retry_backoff_seconds: float = 0.5
    """Pause after a failed store or an unavailable queue."""


@dataclass
class WorkerStats(SourceStats, DeliveryStats):
    """Both parts' counters in one object (each part counts into it)."""


@dataclass(frozen=True)
class EngineSetup:
    """What the engine needs: storage's engine calls, the definitions, and its settings."""

    store: EngineStore
    definitions: Definitions
    config: EngineConfig


class StreamWorker:
    """One consumer of the group: its source and delivery, and the loop that runs them."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        *,
        consumer: str,
        store: StoreBatch,
        config: WorkerConfig | None = None,
        dead_letters: RecordDeadLetter | None = None,
        engine: EngineSetup | None = None,
    ) -> None:
        """`dead_letters` records a dead letter in storage before its entry is acknowledged;
        without it (tests, tools) the dead-letter stream entry is the only record. `engine`
        runs the windows and rules on what is stored; without it entries are only stored."""
        self._client = client
        self._layout = layout
        self._consumer = consumer
        self._config = config = config or WorkerConfig()
        self.stats = WorkerStats()
        self._source = PartitionSource(
            client,
            layout,
            consumer,
            config=config,
            stats=self.stats,
            # The fenced ack forgets an entry's failed attempts in the same step as its XACK.
            forget=functools.partial(attempts_key, layout),
            top_up=config.store_across_max_events > 0,
        )
        self.committer: EngineCommitter | None = None
        if engine is not None:
            self.committer = EngineCommitter(
                self._source,
                stream=layout.prefix,
                store=engine.store,
                definitions=engine.definitions,
                config=engine.config,
            )
            self._source.set_processing(self.committer)
        self._delivery = Deliverer(
            client,
            layout,
            store=store,
            fence=self.committer or self._source,
            config=config,
            stats=self.stats,
            dead_letters=dead_letters,
        )
        self._stopping = asyncio.Event()
        self._leaving = asyncio.Event()

    @property
    def consumer(self) -> str:
        return self._consumer

    @property
    def ownership(self) -> PartitionOwnership:
        """The leases and membership (the source's)."""
        return self._source.ownership

    @property
    def dead_letter_stream(self) -> str:
        return self._delivery.dead_letter_stream

    async def move_legacy_keys(self) -> int:
        """Move the queue's keys from the layout before the hash tags (the source's); before
        run(), which does it too when this was not done."""
        return await self._source.move_legacy_keys()

    def stop(self) -> None:
        """Finish the entries in hand, then release every lease and leave (graceful stop)."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until stop(). A cancelled run() behaves like a crash: leases and membership
        are left to expire, and pending entries stay for the next owners."""
        heartbeats = asyncio.create_task(
            self.ownership.run(self._leaving), name=f"heartbeat-{self._consumer}"
        )
        try:
            await self.ownership.wait_first_heartbeat(self._config.heartbeat_ms / 1000)
            await self._consume()
            if self.committer is not None:
                # A graceful stop: save the state, so the next owners replay nothing.
                try:
                    await self.committer.release(sorted(self._source.active()))
                except (RedisError, OSError) as error:
                    log.warning("could not acknowledge the last checkpoint's entries: %s", error)
        finally:
            self._leaving.set()
            await stop_task(heartbeats)
        try:
            await self.ownership.leave()
        except (RedisError, OSError) as error:
            log.warning("could not release leases (they expire on their own): %s", error)

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            raise_if_cancelled()
            try:
                await self._source.prepare()
                await self._round()
            except (RedisError, OSError) as error:
                self._source.queue_failed(error)
                await self._pause(f"the queue is unavailable: {error}")

    async def _round(self) -> None:
        """One read-store-ack round over the owned partitions."""
        work = await self._source.poll()
        if work is None:
            await wait_event(self._stopping, self._source.tick)
            return
        outcomes = await self._delivery.drain(work)
        if self.committer is not None:
            await self.committer.tick([partition for partition, _ in work])
        retry = [p for p, outcome in outcomes.items() if outcome is Outcome.RETRY]
        if retry:
            self._source.read_pending_first(retry)
            await self._pause(self.stats.last_error)

    async def _pause(self, reason: str) -> None:
        log.warning("pausing %.1fs: %s", self._config.retry_backoff_seconds, reason)
        await wait_event(self._stopping, self._config.retry_backoff_seconds)

    async def partition_status(self) -> list[processor_pb2.PartitionStatus]:
        """Length and pending count of every partition (one round trip)."""
        return await partition_status(self._client, self._layout)
