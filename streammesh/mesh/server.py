"""The server factory every service uses: grpc.aio, TLS (mutual on internal listeners), health,
reflection, limits, the interceptor list (metrics, errors, deadline, guard, decoding), the
/metrics endpoint, and a graceful drain on SIGTERM.

The drain, in order: health NOT_SERVING for every hosted service (health-checked round_robin
clients stop picking this replica), a short propagation delay (`drain_delay_seconds`: calls
still arriving meanwhile are served), then gRPC's graceful stop (new calls are refused, calls and
streams in flight get `grace_seconds` to finish, then are cancelled), then the service's own
`on_stop`. The delay is skipped when no client has a health Watch open (only health-checking
balancers act on NOT_SERVING), so a stack that stops edge first does not wait it out at every
tier. (Clients' Watch streams do not hold the graceful stop: measured, a stop with a watching
client and no call in flight returns at once.)
Health also follows the service's dependencies (`watch_dependencies`, streammesh.mesh.health).

TLS material is read from the service's files before each new handshake (gRPC's dynamic server
credentials, streammesh.mesh.tls_reload): a rotated certificate or CA bundle is presented and
trusted from the next connection on, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from streammesh.mesh.health import DependencyCheck, DependencyWatcher
from streammesh.mesh.interceptors import (
    DeadlineInterceptor,
    DecodeInterceptor,
    ErrorInterceptor,
    Guard,
    GuardInterceptor,
)
from streammesh.mesh.interceptors.tracing import ServerTracingInterceptor
from streammesh.mesh.logs import LogThrottle
from streammesh.mesh.metrics import MetricsEndpoint, ServerMetricsInterceptor, ServiceMetrics
from streammesh.mesh.metrics.security import PolicyDenialCollector
from streammesh.mesh.pki import TlsMaterial
from streammesh.mesh.policy import PeerPolicy
from streammesh.mesh.settings import ServiceSettings
from streammesh.mesh.startup import StartupError, listen_problem, load_tls
from streammesh.mesh.tls_reload import ServerCredentialsReloader
from streammesh.mesh.tracing import tracing_enabled

__all__ = [
    "HealthServicer",
    "MeshServer",
    "ServiceBinding",
    "create_mesh_server",
    "run_until_signalled",
    "standard_interceptors",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to host: its descriptor, the generated `add_*_to_server`, the servicer."""

    descriptor: ServiceDescriptor
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: object


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """grpc_health's servicer, counting the Watch streams open on it: a client balancing with
    health checks keeps one open per connection, so with none open no balancer needs the
    drain delay to learn of NOT_SERVING."""

    def __init__(self) -> None:
        super().__init__()
        self.watching = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1


@dataclass
class MeshServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    service_names: tuple[str, ...]
    metrics: ServiceMetrics
    """The service's registry: the gRPC families, build info, and what the service adds."""
    metrics_endpoint: MetricsEndpoint | None = None
    """/metrics over HTTP, when the metrics_port setting asks for it."""
    drain_delay: float = 0.0
    """Seconds between NOT_SERVING and the graceful stop on SIGTERM, while a client watches
    this server's health."""
    probe_interval: float = 1.0
    probe_timeout: float = 1.0
    watcher: DependencyWatcher | None = field(default=None)

    def watch_dependencies(self, *checks: DependencyCheck) -> DependencyWatcher:
        """Report NOT_SERVING while any of `checks` fails, from `start` until the stop."""
        self.watcher = DependencyWatcher(
            self.health,
            self.service_names,
            checks,
            interval=self.probe_interval,
            timeout=self.probe_timeout,
        )
        return self.watcher

    async def start(self) -> None:
        """Start serving (and /metrics) and report SERVING for each hosted service and
        overall ("")."""
        await self.server.start()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.watcher is not None:
            self.watcher.start()

    async def stop(self, grace: float, *, delay: float = 0.0) -> float:
        """Report NOT_SERVING first so balancers move away, wait `delay` seconds for that to
        reach them (calls arriving meanwhile are served; no wait when no client watches our
        health: no balancer is left to tell), then let in-flight calls finish within `grace`.
        Returns the delay waited. /metrics goes last, so a scrape can see the drain."""
        await self.health.enter_graceful_shutdown()
        if self.watcher is not None:
            await self.watcher.stop()
        waited = delay if delay > 0 and self.health.watching else 0.0
        if waited:
            await asyncio.sleep(waited)
        await self.server.stop(grace)
        if self.metrics_endpoint is not None:
            # Its serving thread notices the shutdown within half a second: not on the loop.
            await asyncio.to_thread(self.metrics_endpoint.stop)
        return waited


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Recycle long-lived connections so round_robin clients spread over new replicas.
        ("grpc.max_connection_age_ms", round(settings.max_connection_age_seconds * 1000)),
        (
            "grpc.max_connection_age_grace_ms",
            round(settings.max_connection_age_grace_seconds * 1000),
        ),
        # Two processes must never share a port silently (gRPC enables SO_REUSEPORT by default).
        ("grpc.so_reuseport", 0),
    ]


def standard_interceptors(
    settings: ServiceSettings,
    *,
    guard: Guard | None,
    metrics: ServiceMetrics,
    throttle: LogThrottle | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The list every service runs, outermost first: tracing when it is on (its span is current
    in every layer inside it, so that their log lines carry the trace id, and it costs the
    metrics' timing nothing), metrics unless metrics_enabled is false (they see the status each
    call ended with), errors (the one place exceptions become statuses), deadline, guard. The
    server factory appends the decoding layer, which must come last."""
    interceptors: list[grpc.aio.ServerInterceptor] = [
        *([ServerTracingInterceptor()] if tracing_enabled() else []),
        *([ServerMetricsInterceptor(metrics.grpc_server)] if settings.metrics_enabled else []),
        ErrorInterceptor(throttle=throttle),
        DeadlineInterceptor(settings.default_deadline_seconds),
    ]
    if guard is not None:
        interceptors.append(GuardInterceptor(guard))
    return interceptors


def create_mesh_server(
    settings: ServiceSettings,
    *,
    identity: str,
    bindings: Sequence[ServiceBinding],
    guard: Guard | None,
    require_client_cert: bool = True,
    tls: TlsMaterial | None = None,
    metrics: ServiceMetrics | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
) -> MeshServer:
    """Build (not start) a server for `identity` (the certificate's file name, e.g. "storage").

    Internal services pass `require_client_cert=True` and a PeerPolicy guard; only the public
    gateway listener accepts clients without a certificate, and it guards with tokens instead.
    `metrics` is the service's registry (a new one when not given); `interceptors` replaces
    `standard_interceptors(settings, guard=guard, metrics=metrics)` (`guard` is then unused),
    and the decoding layer is appended to either: handlers are registered without their
    request deserializer and rely on it.
    """
    metrics = metrics or ServiceMetrics(identity)
    credentials, material = _server_credentials(
        settings, identity, tls, require_client_cert=require_client_cert, metrics=metrics
    )
    if isinstance(guard, PeerPolicy):
        metrics.registry.register(PolicyDenialCollector(guard.denials.counts))
    metrics.certificate(identity, material.certificate_chain)
    throttle = LogThrottle(logging.getLogger("streammesh.mesh.interceptors"))
    chosen = (
        list(interceptors)
        if interceptors is not None
        else standard_interceptors(settings, guard=guard, metrics=metrics, throttle=throttle)
    )
    server = grpc.aio.server(
        interceptors=[*chosen, DecodeInterceptor(throttle=throttle)],
        options=server_options(settings),
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(binding.descriptor.full_name for binding in bindings)
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    metrics.grpc_server.initialize(binding.descriptor for binding in bindings)
    reflection.enable_server_reflection(
        (
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        port = server.add_secure_port(f"{settings.host}:{settings.port}", credentials)
    except RuntimeError as error:
        problem = listen_problem(settings.host, settings.port, settings.tls_dir)
        env = settings.model_config.get("env_prefix", "STREAMMESH_")
        raise StartupError(f"{problem} (settings {env}HOST, {env}PORT)") from error
    endpoint = (
        MetricsEndpoint(metrics.registry, settings.metrics_host, settings.metrics_port)
        if settings.metrics_port and settings.metrics_enabled
        else None
    )
    return MeshServer(
        server=server,
        port=port,
        health=health_servicer,
        service_names=names,
        metrics=metrics,
        metrics_endpoint=endpoint,
        drain_delay=settings.drain_delay_seconds,
        probe_interval=settings.health_interval_seconds,
        probe_timeout=settings.health_timeout_seconds,
    )


def _server_credentials(
    settings: ServiceSettings,
    identity: str,
    tls: TlsMaterial | None,
    *,
    require_client_cert: bool,
    metrics: ServiceMetrics,
) -> tuple[grpc.ServerCredentials, TlsMaterial]:
    """Credentials that follow the files in tls_dir (a rotated certificate or CA bundle is
    presented and trusted from the next new connection on: streammesh.mesh.tls_reload), or
    fixed ones when the caller passes its own material."""
    if tls is not None:
        fixed = grpc.ssl_server_credentials(
            [(tls.private_key, tls.certificate_chain)],
            root_certificates=tls.ca,
            require_client_auth=require_client_cert,
        )
        return fixed, tls
    load_tls(settings.tls_dir, identity)  # a missing file is a StartupError naming it
    try:
        reloader = ServerCredentialsReloader(
            settings.tls_dir,
            identity,
            require_client_cert=require_client_cert,
            on_change=lambda new: metrics.certificate(identity, new.certificate_chain),
        )
    except ValueError as error:
        raise StartupError(
            f"TLS material of {identity!r} in {settings.tls_dir}: {error}"
        ) from error
    return reloader.credentials(), reloader.material


async def run_until_signalled(
    mesh: MeshServer,
    *,
    grace: float,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain: health NOT_SERVING, the server's drain
    delay, in-flight calls finish within `grace`, then `on_stop` (background workers, pools)
    runs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await mesh.start()
    log.info("serving %s on port %d", ", ".join(mesh.service_names), mesh.port)
    await stop.wait()
    log.info(
        "draining: NOT_SERVING (%d health watchers), up to %.1fs, then grace %.1fs",
        mesh.health.watching,
        mesh.drain_delay,
        grace,
    )
    await mesh.stop(grace, delay=mesh.drain_delay)
    if on_stop is not None:
        await on_stop()
    log.info("stopped")
