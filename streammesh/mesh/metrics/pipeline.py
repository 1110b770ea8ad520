"""The pipeline's own metrics, counted per batch (never per event in Python) and, for the queue's
backlog, read from what back-pressure sampled anyway, at scrape time.

    streammesh_ingest_events_accepted_total        events appended to the queue (acknowledged)
    streammesh_ingest_events_refused_total         events refused one by one (payload schema)
    streammesh_ingest_backpressure_refusals_total  batches refused whole by back-pressure
    streammesh_queue_unacked_events{partition}     events queued and not yet stored (last sample)
    streammesh_queue_unacked_bytes{partition}
    streammesh_storage_events_stored_total         events inserted (ids new to the store)
    streammesh_storage_events_duplicate_total      events of a batch whose id was stored before
    streammesh_storage_dead_letters_total          dead letters recorded (a repeat not counted)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BacklogSource", "IngestMetrics", "QueueBacklogCollector", "StorageMetrics"]


class IngestMetrics:
    """What ingest counts per batch."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Without a registry the counters count into one of their own (tests, tools)."""
        registry = registry if registry is not None else CollectorRegistry()
        self.events_accepted = Counter(
            "streammesh_ingest_events_accepted_total",
            "Events appended to the queue and acknowledged to the publisher.",
            registry=registry,
        )
        self.events_refused = Counter(
            "streammesh_ingest_events_refused_total",
            "Events refused one by one (payload not valid for its registered schema).",
            registry=registry,
        )
        self.backpressure_refusals = Counter(
            "streammesh_ingest_backpressure_refusals_total",
            "Batches refused whole by back-pressure (RESOURCE_EXHAUSTED; retry later).",
            registry=registry,
        )


class StorageMetrics:
    """What storage counts per batch."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Without a registry the counters count into one of their own (tests, tools)."""
        registry = registry if registry is not None else CollectorRegistry()
        self.events_stored = Counter(
            "streammesh_storage_events_stored_total",
            "Events inserted into the store (ids new to it).",
            registry=registry,
        )
        self.events_duplicate = Counter(
            "streammesh_storage_events_duplicate_total",
            "Events of a StoreEvents batch whose id was already stored (a replay).",
            registry=registry,
        )
        self.dead_letters = Counter(
            "streammesh_storage_dead_letters_total",
            "Dead letters recorded (entries the processor gave up on; a repeat is not counted).",
            registry=registry,
        )


class _Backlog(Protocol):
    @property
    def events(self) -> int: ...
    @property
    def bytes(self) -> int: ...


class BacklogSource(Protocol):
    """What ingest's back-pressure sampler offers: the last sample of one partition."""

    def backlog(self, partition: int) -> _Backlog | None: ...


class QueueBacklogCollector(Collector):
    """The queue's unacknowledged events and bytes per partition, as back-pressure last sampled
    them (no Redis call at scrape time). A partition not sampled yet is left out."""

    def __init__(self, source: BacklogSource, partitions: int) -> None:
        self._source = source
        self._partitions = partitions

    def collect(self) -> Iterator[Metric]:
        events = GaugeMetricFamily(
            "streammesh_queue_unacked_events",
            "Events queued and not yet acknowledged by the processor (last sample).",
            labels=("partition",),
        )
        size = GaugeMetricFamily(
            "streammesh_queue_unacked_bytes",
            "Bytes of the events queued and not yet acknowledged (last sample).",
            labels=("partition",),
        )
        for partition in range(self._partitions):
            backlog = self._source.backlog(partition)
            if backlog is None:
                continue
            events.add_metric((str(partition),), backlog.events)
            size.add_metric((str(partition),), backlog.bytes)
        yield events
        yield size
