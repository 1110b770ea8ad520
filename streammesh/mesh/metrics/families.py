"""The five gRPC metric families of go-grpc-prometheus, for the server or the client side.

    grpc_<side>_started_total{grpc_type, grpc_service, grpc_method}
    grpc_<side>_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}
    grpc_<side>_handling_seconds{grpc_type, grpc_service, grpc_method}   (histogram)
    grpc_<side>_msg_received_total{grpc_type, grpc_service, grpc_method}
    grpc_<side>_msg_sent_total{grpc_type, grpc_service, grpc_method}

grpc_type is unary, client_stream, server_stream or bidi_stream; grpc_code is Go's name of the
status ("OK", "InvalidArgument", ...). A method's label children are looked up once
(`MethodMetrics`), so a call costs a few increments and one histogram observation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram

from streammesh.mesh.interceptors.base import Rpc
from streammesh.mesh.metrics.codes import GO_CODE_NAMES

__all__ = ["HANDLING_BUCKETS", "GrpcMetrics", "MethodMetrics"]

HANDLING_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds; go-grpc-prometheus' defaults (5 ms .. 10 s) and three below 5 ms, where most of
our unary calls end."""

_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class GrpcMetrics:
    """The five metric families of one side ("server" or "client"), registered in `registry`."""

    def __init__(self, registry: CollectorRegistry, *, side: str = "server") -> None:
        prefix = f"grpc_{side}"
        self.started = Counter(
            f"{prefix}_started_total",
            f"RPCs started on the {side}.",
            _LABELS,
            registry=registry,
        )
        self.handled = Counter(
            f"{prefix}_handled_total",
            f"RPCs completed on the {side}, whatever their status.",
            (*_LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            f"{prefix}_handling_seconds",
            f"Response latency (seconds) of RPCs until completed on the {side}.",
            _LABELS,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )
        self.msg_received = Counter(
            f"{prefix}_msg_received_total",
            f"Stream messages received on the {side} (1 per unary request or response).",
            _LABELS,
            registry=registry,
        )
        self.msg_sent = Counter(
            f"{prefix}_msg_sent_total",
            f"Stream messages sent on the {side} (1 per unary request or response).",
            _LABELS,
            registry=registry,
        )

    def initialize(self, services: Iterable[ServiceDescriptor]) -> None:
        """Create every method's series at 0 (go-grpc-prometheus' InitializeMetrics), so that
        rates are right from the first call and a method never called still shows."""
        for service in services:
            for method in service.methods:
                rpc = Rpc(
                    f"/{service.full_name}/{method.name}",
                    service.full_name,
                    method.name,
                    method.client_streaming,
                    method.server_streaming,
                )
                MethodMetrics(self, rpc).handled_child(grpc.StatusCode.OK)


class MethodMetrics:
    """One method's label children, looked up once."""

    __slots__ = (
        "_handled",
        "_labels",
        "_metrics",
        "handled_by_code",
        "received",
        "seconds",
        "sent",
        "started",
    )

    def __init__(self, metrics: GrpcMetrics, rpc: Rpc) -> None:
        labels = (rpc.grpc_type, rpc.service, rpc.name)
        self._labels = labels
        self._metrics = metrics
        self.started = metrics.started.labels(*labels)
        self.received = metrics.msg_received.labels(*labels)
        self.sent = metrics.msg_sent.labels(*labels)
        self.seconds = metrics.handling_seconds.labels(*labels)
        self.handled_by_code: dict[grpc.StatusCode, Any] = {}

    def handled_child(self, code: grpc.StatusCode) -> Any:
        """The handled counter of this method for `code`."""
        child = self.handled_by_code.get(code)
        if child is None:
            child = self._metrics.handled.labels(*self._labels, GO_CODE_NAMES[code])
            self.handled_by_code[code] = child
        return child
