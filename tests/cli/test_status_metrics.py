"""The figures of `streammesh status` from two scrapes: rates, error ratio and p99 as
Prometheus's rate() and histogram_quantile() would compute them. The expositions are produced by
prometheus_client itself from real counters and a histogram, not written by hand."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streammesh.cli.status_metrics import figures, parse, quantile

LABELS = ("grpc_type", "grpc_service", "grpc_method", "grpc_code")


class FakeReplica:
    """A registry with the go-grpc-prometheus families a service exposes (pure logic: no I/O)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.handled = Counter("grpc_server_handled", "calls", LABELS, registry=self.registry)
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "time",
            LABELS[:3],
            buckets=(0.001, 0.01, 0.1, 1.0),
            registry=self.registry,
        )
        self.owned = Gauge("streammesh_processor_partitions_owned", "owned", registry=self.registry)
        self.lag = Gauge(
            "streammesh_processor_partition_lag", "lag", ["partition"], registry=self.registry
        )

    def call(
        self, code: str, seconds: float, *, kind: str = "unary", service: str = "g.v1.G"
    ) -> None:
        self.handled.labels(kind, service, "M", code).inc()
        self.seconds.labels(kind, service, "M").observe(seconds)

    def reading(self, at: float):  # type: ignore[no-untyped-def]
        return parse(generate_latest(self.registry).decode(), at)


def test_rates_errors_and_p99_cover_only_the_window() -> None:
    replica = FakeReplica()
    for _ in range(1000):  # before the window: slow calls that must not count
        replica.call("Internal", 0.5)
    before = replica.reading(10.0)
    for _ in range(95):
        replica.call("OK", 0.005)
    for _ in range(3):
        replica.call("InvalidArgument", 0.005)  # a client's mistake, not a server fault
    for _ in range(2):
        replica.call("Unavailable", 0.05)
    for _ in range(50):  # probes and stream lifetimes are left out
        replica.call("OK", 0.9, service="grpc.health.v1.Health")
    replica.call("OK", 30.0, kind="bidi_stream")
    replica.owned.set(3)
    replica.lag.labels("0").set(5)
    replica.lag.labels("1").set(7)
    measured = figures(before, replica.reading(12.0))
    assert measured.requests_per_second == pytest.approx(101 / 2.0)
    assert measured.error_ratio == pytest.approx(2 / 101)
    # 100 unary calls in the window: rank 99 falls in (0.01, 0.1] holding the 2 calls 98..100.
    assert measured.p99_seconds == pytest.approx(0.01 + 0.09 * (99 - 98) / 2)
    assert (measured.partitions_owned, measured.lag) == (3, 12)


def test_one_scrape_gives_gauges_only_and_none_gives_nothing() -> None:
    replica = FakeReplica()
    replica.owned.set(2)
    only = figures(None, replica.reading(1.0))
    assert (only.requests_per_second, only.p99_seconds, only.partitions_owned) == (None, None, 2)
    assert figures(None, None).partitions_owned is None


def test_quantile_edges() -> None:
    assert quantile(0.99, {}) is None
    assert quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None
    # Every call beyond the last finite bound: that bound, as histogram_quantile answers.
    assert quantile(0.5, {0.1: 0.0, 1.0: 0.0, float("inf"): 10.0}) == 1.0
    assert quantile(0.5, {0.1: 10.0, float("inf"): 10.0}) == pytest.approx(0.05)
