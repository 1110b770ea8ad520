"""Prometheus metrics of the mesh runtime: a registry per service with its /metrics endpoint,
gRPC server and client metrics with go-grpc-prometheus' names, and the pipeline's counters."""

from streammesh.mesh.metrics.client import client_interceptors
from streammesh.mesh.metrics.codes import code_label
from streammesh.mesh.metrics.families import HANDLING_BUCKETS, GrpcMetrics
from streammesh.mesh.metrics.registry import MetricsEndpoint, ServiceMetrics
from streammesh.mesh.metrics.server import ServerMetricsInterceptor

__all__ = [
    "HANDLING_BUCKETS",
    "GrpcMetrics",
    "MetricsEndpoint",
    "ServerMetricsInterceptor",
    "ServiceMetrics",
    "client_interceptors",
    "code_label",
]
