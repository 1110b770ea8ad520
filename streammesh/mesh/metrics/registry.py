"""A service's own metrics registry, and its /metrics HTTP endpoint.

Every service (and every server a test builds) has a CollectorRegistry of its own, never
prometheus_client's global one: tests run many servers in one process, and two registrations of
one name in one registry are refused.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from importlib import metadata
from wsgiref.simple_server import WSGIServer

from cryptography import x509
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from streammesh.mesh.metrics.families import GrpcMetrics

__all__ = ["MetricsEndpoint", "ServiceMetrics", "build_version", "certificate_not_after"]

log = logging.getLogger(__name__)


def build_version() -> str:
    """The installed streammesh distribution's version ("unknown" when not installed)."""
    try:
        return metadata.version("streammesh")
    except metadata.PackageNotFoundError:
        return "unknown"


def certificate_not_after(pem_chain: bytes) -> dt.datetime:
    """When the first (leaf) certificate of a PEM chain expires."""
    return x509.load_pem_x509_certificate(pem_chain).not_valid_after_utc


class ServiceMetrics:
    """One service's registry: gRPC server and client families, build info, process and
    runtime collectors, and the certificate expiry gauge. Services add their own families
    (streammesh.mesh.metrics.pipeline) to `registry`."""

    def __init__(self, service: str, *, version: str | None = None) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.grpc_server = GrpcMetrics(self.registry, side="server")
        self.grpc_client = GrpcMetrics(self.registry, side="client")
        build = Gauge(
            "streammesh_build_info",
            "Always 1; the running build's version in its label.",
            ("version",),
            registry=self.registry,
        )
        build.labels(version or build_version()).set(1)
        self._certificate_expiry = Gauge(
            "streammesh_tls_certificate_expiry_timestamp_seconds",
            "When the service's own TLS certificate expires (Unix time).",
            ("identity",),
            registry=self.registry,
        )
        # What the default registry would have had: CPU, memory, file descriptors, GC.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def certificate(self, identity: str, pem_chain: bytes) -> None:
        """Publish when `identity`'s certificate (the leaf of `pem_chain`) expires."""
        expiry = certificate_not_after(pem_chain)
        self._certificate_expiry.labels(identity).set(expiry.timestamp())


class MetricsEndpoint:
    """GET /metrics of one registry over plain HTTP, from a thread of its own.

    A port already taken does not stop the service: it logs a warning and serves without the
    endpoint (Prometheus then reports the target down), because several local stacks of tests
    and of a developer share the stack's default ports. Port 0 picks a free one."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The port listened on; None before start or when it could not listen."""
        return None if self._server is None else int(self._server.server_port)

    def start(self) -> int | None:
        """Listen and serve; the port, or None when it could not listen."""
        try:
            self._server, self._thread = start_http_server(
                self._port, addr=self._host, registry=self._registry
            )
        except OSError as error:
            log.warning(
                "metrics endpoint not started: cannot listen on %s:%d: %s; the service runs "
                "without /metrics (set its METRICS_PORT to a free port, or 0 for none)",
                self._host,
                self._port,
                error.strerror or error,
            )
            return None
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop listening and wait for the serving thread."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
