"""The processor's metrics, read at scrape time from the integer counters the worker keeps
anyway (no Python work per event or per batch on the hot path), and its partitions' lag and
pending counts from one XINFO GROUPS round trip per owned partition, sampled at most every
`interval` seconds by a task of the processor's event loop (a scrape never touches Redis).

    streammesh_processor_partitions_owned               partitions this replica holds now
    streammesh_processor_takeovers_total                partitions taken over (rebalances)
    streammesh_processor_entries_claimed_total          pending entries claimed from others
    streammesh_processor_events_stored_total            events storage inserted for us
    streammesh_processor_events_duplicate_total         events storage had already
    streammesh_processor_store_failures_total           failed StoreEvents calls (retried)
    streammesh_processor_dead_letters_total             entries set aside as dead letters
    streammesh_processor_window_results_total           engine outputs stored, by kind...
    streammesh_processor_late_events_total
    streammesh_processor_alerts_total
    streammesh_processor_checkpoints_total              engine checkpoints saved
    streammesh_processor_engine_duplicates_total{partition}  repeated events the engine dropped
    streammesh_processor_partition_lag{partition}       entries not yet delivered to the group
    streammesh_processor_partition_pending{partition}   entries delivered, not yet acknowledged
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from streammesh.streams import StreamLayout

__all__ = ["PartitionLagSampler", "ProcessorCollector", "ProcessorView"]

log = logging.getLogger(__name__)

_STATS = (
    ("takeovers", "takeovers", "Partitions taken over by this replica (after a rebalance)."),
    ("entries_claimed", "entries_claimed", "Pending entries claimed from other consumers."),
    ("events_stored", "events_stored", "Events storage inserted for this replica."),
    ("events_duplicate", "events_duplicate", "Events storage had stored before (redeliveries)."),
    (
        "store_failures",
        "store_failures",
        "StoreEvents calls that failed (the entries are retried).",
    ),
    ("dead_letters", "dead_lettered", "Queue entries set aside as dead letters and acknowledged."),
)
"""(metric name part, WorkerStats attribute, help) of the worker's own counters."""

_ENGINE = (
    ("window_results", "window_results_stored", "Window results the engine stored."),
    ("late_events", "late_events_stored", "Late events (of windows and rules) the engine stored."),
    ("alerts", "alerts_stored", "Alerts the engine's rules raised and stored."),
    ("checkpoints", "checkpoints", "Engine checkpoints saved (state with its outputs)."),
)
"""The same for the engine's committer (absent when the engine is off: reported as 0)."""


class _Ownership(Protocol):
    def held(self) -> frozenset[int]: ...


class ProcessorView(Protocol):
    """What the collector reads of a `StreamWorker` (its stats, committer and leases)."""

    @property
    def stats(self) -> object: ...
    @property
    def committer(self) -> object | None: ...
    @property
    def ownership(self) -> _Ownership: ...


class PartitionLagSampler:
    """The lag and pending count of the partitions `owned()` names, from one pipelined XINFO
    GROUPS per `interval` seconds; `run()` samples until cancelled. A partition whose lag Redis
    cannot compute (after some AOF reloads) reports only its pending count."""

    def __init__(
        self,
        client: aioredis.Redis,
        layout: StreamLayout,
        owned: _Ownership,
        *,
        interval: float = 5.0,
    ) -> None:
        self._client = client
        self._layout = layout
        self._owned = owned
        self._interval = interval
        self.lag: dict[int, int] = {}
        """Last sample per partition (replaced whole, so a scrape reads one consistent dict)."""
        self.pending: dict[int, int] = {}

    async def sample(self) -> None:
        """Read the owned partitions' group info once (one round trip)."""
        partitions = sorted(self._owned.held())
        async with self._client.pipeline(transaction=False) as pipe:
            for partition in partitions:
                pipe.xinfo_groups(self._layout.stream(partition))
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        lag: dict[int, int] = {}
        pending: dict[int, int] = {}
        group = self._layout.group.encode()
        for partition, reply in zip(partitions, replies, strict=True):
            for info in reply if isinstance(reply, list) else ():
                name = info.get("name")
                if (name.encode() if isinstance(name, str) else name) != group:
                    continue
                pending[partition] = int(info.get("pending") or 0)
                if info.get("lag") is not None:
                    lag[partition] = int(info["lag"])
        self.lag, self.pending = lag, pending

    async def run(self) -> None:
        """Sample every `interval` seconds until cancelled; a Redis error skips one sample."""
        while True:
            try:
                await self.sample()
            except (RedisError, OSError) as error:
                log.debug("partition lag not sampled: %s", error)
            await asyncio.sleep(self._interval)


class ProcessorCollector(Collector):
    """The worker's counters and the sampler's last lag, read when Prometheus scrapes."""

    def __init__(self, worker: ProcessorView, lag: PartitionLagSampler | None = None) -> None:
        self._worker = worker
        self._lag = lag

    def collect(self) -> Iterator[Metric]:
        owned = GaugeMetricFamily(
            "streammesh_processor_partitions_owned",
            "Queue partitions this processor replica holds the lease of.",
        )
        owned.add_metric((), len(self._worker.ownership.held()))
        yield owned
        stats = self._worker.stats
        for name, attribute, doc in _STATS:
            yield CounterMetricFamily(
                f"streammesh_processor_{name}", doc, value=getattr(stats, attribute)
            )
        committer = self._worker.committer
        for name, attribute, doc in _ENGINE:
            value = 0 if committer is None else getattr(committer, attribute)
            yield CounterMetricFamily(f"streammesh_processor_{name}", doc, value=value)
        duplicates = CounterMetricFamily(
            "streammesh_processor_engine_duplicates",
            "Events the engine dropped before its windows and rules as a repeat of a (tenant, "
            "type, event id) it had taken (a publish retried past ingest's idempotency window, "
            "an id reused), per queue partition.",
            labels=("partition",),
        )
        dropped: dict[int, int] = getattr(committer, "duplicates_dropped", {})
        for partition, count in sorted(dropped.items()):
            duplicates.add_metric((str(partition),), count)
        yield duplicates
        lag = GaugeMetricFamily(
            "streammesh_processor_partition_lag",
            "Entries of an owned partition not yet delivered to the group (last sample).",
            labels=("partition",),
        )
        pending = GaugeMetricFamily(
            "streammesh_processor_partition_pending",
            "Entries of an owned partition delivered and not yet acknowledged (last sample).",
            labels=("partition",),
        )
        if self._lag is not None:
            for partition, value in sorted(self._lag.lag.items()):
                lag.add_metric((str(partition),), value)
            for partition, value in sorted(self._lag.pending.items()):
                pending.add_metric((str(partition),), value)
        yield lag
        yield pending
