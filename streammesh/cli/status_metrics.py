"""What `streammesh status` reads from each replica's /metrics: request rate, error ratio, p99,
partitions owned and lag.

Rates need two readings: the figures of one status line are the difference between two scrapes
of the same replica `window` seconds apart (or between two rounds of `--watch`), as Prometheus's
`rate()` and `histogram_quantile()` would compute them over that window:

- requests/s: grpc_server_handled_total, every method but the health service's probes;
- error ratio: the share of those with a server-side failure code (Unknown, DeadlineExceeded,
  Unimplemented, Internal, Unavailable, DataLoss: the codes of the shipped error-ratio alert in
  docs/prometheus/alerts.yml), so a client's INVALID_ARGUMENT is not an error of ours;
- p99: of unary calls only (a stream's handling time is its lifetime), interpolated in the
  grpc_server_handling_seconds buckets like histogram_quantile();
- partitions and lag: the processor's gauges (streammesh_processor_partitions_owned, the sum of
  streammesh_processor_partition_lag), read from the second scrape.

The text format is parsed by prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Reading", "ReplicaFigures", "figures", "read_metrics"]

_SERVER_FAULTS = frozenset(
    {"Unknown", "DeadlineExceeded", "Unimplemented", "Internal", "Unavailable", "DataLoss"}
)
_PROBES = "grpc.health.v1.Health"

Labels = dict[str, str]


@dataclass(frozen=True)
class Reading:
    """One scrape of one replica: every sample by name, and when it was taken (monotonic)."""

    at: float
    samples: dict[str, list[tuple[Labels, float]]]

    def total(self, name: str, **match: str) -> float | None:
        """The sum of `name`'s samples whose labels match; None when the replica has none."""
        values = [v for labels, v in self.samples.get(name, ()) if _matches(labels, match)]
        return sum(values) if values else None


@dataclass(frozen=True)
class ReplicaFigures:
    """One status line's measured part (None: not measurable, e.g. no metrics port)."""

    requests_per_second: float | None
    error_ratio: float | None
    p99_seconds: float | None
    partitions_owned: int | None
    lag: int | None
    window_seconds: float | None = None
    """The time between the two scrapes the rates cover."""


def _matches(labels: Labels, match: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in match.items())


def parse(text: str, at: float) -> Reading:
    samples: dict[str, list[tuple[Labels, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return Reading(at=at, samples=samples)


def _fetch(url: str, timeout: float) -> str:
    # Loopback http only: the metrics listener is the services' own host (stack_config).
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310
        body: bytes = reply.read()
    return body.decode()


async def read_metrics(url: str, *, timeout: float = 2.0) -> Reading | None:
    """One scrape of `url`, or None when the replica's /metrics does not answer."""
    try:
        text = await asyncio.to_thread(_fetch, url, timeout)
    except (OSError, ValueError):
        return None
    return parse(text, time.monotonic())


def _handled(reading: Reading) -> tuple[float, float]:
    """(all calls, server-fault calls) handled so far, probes left out."""
    calls = faults = 0.0
    for labels, value in reading.samples.get("grpc_server_handled_total", ()):
        if labels.get("grpc_service") == _PROBES:
            continue
        calls += value
        if labels.get("grpc_code") in _SERVER_FAULTS:
            faults += value
    return calls, faults


def _unary_buckets(reading: Reading) -> dict[float, float]:
    """Cumulative counts of unary calls by bucket upper bound, every method summed."""
    buckets: dict[float, float] = {}
    for labels, value in reading.samples.get("grpc_server_handling_seconds_bucket", ()):
        if labels.get("grpc_type") != "unary" or labels.get("grpc_service") == _PROBES:
            continue
        bound = float(labels["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value
    return buckets


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """histogram_quantile(q, ...) over cumulative bucket counts: linear interpolation inside the
    bucket holding the rank; the highest finite bound when the rank falls in +Inf."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None


def figures(before: Reading | None, after: Reading | None) -> ReplicaFigures:
    """The line's figures from two scrapes of one replica (`before` taken first)."""
    if after is None:
        return ReplicaFigures(None, None, None, None, None)
    owned = after.total("streammesh_processor_partitions_owned")
    lag = after.total("streammesh_processor_partition_lag")
    rate = ratio = p99 = window = None
    if before is not None and after.at > before.at:
        window = after.at - before.at
        calls_before, faults_before = _handled(before)
        calls_after, faults_after = _handled(after)
        calls = max(calls_after - calls_before, 0.0)
        rate = calls / window
        ratio = max(faults_after - faults_before, 0.0) / calls if calls else 0.0
        earlier = _unary_buckets(before)
        in_window = {b: c - earlier.get(b, 0.0) for b, c in _unary_buckets(after).items()}
        p99 = quantile(0.99, in_window)
    return ReplicaFigures(
        requests_per_second=rate,
        error_ratio=ratio,
        p99_seconds=p99,
        partitions_owned=None if owned is None else int(owned),
        lag=None if lag is None else int(lag),
        window_seconds=window,
    )
