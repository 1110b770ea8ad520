"""Gateway wiring: settings -> upstream channels -> audit trail -> token verifier -> the public
TLS listener hosting GatewayService and AdminService."""

from __future__ import annotations

import dataclasses
import logging

from services.gateway.access import AccessGuard
from services.gateway.admin import AdminServicer
from services.gateway.audit import AuditTrail
from services.gateway.jwks_http import JwksHttpListener
from services.gateway.publish import RelayLimits
from services.gateway.revocations import RevocationFollower, RevocationList
from services.gateway.rules import RuleServicer
from services.gateway.schema_registry import SchemaRegistryServicer
from services.gateway.service import GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.tokens import JwksCache, Reason, TokenVerifier
from services.gateway.upstream import Upstreams
from streammesh.api.gateway.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    rules_pb2,
    rules_pb2_grpc,
    schema_registry_pb2,
    schema_registry_pb2_grpc,
)
from streammesh.mesh import (
    MeshServer,
    ServiceBinding,
    create_mesh_server,
    run_until_signalled,
)
from streammesh.mesh.client import TlsFiles
from streammesh.mesh.metrics import ServiceMetrics
from streammesh.mesh.metrics.security import TokenRefusalCollector
from streammesh.mesh.startup import load_tls, run_service

__all__ = [
    "GatewayServer",
    "create_audit_trail",
    "create_revocation_follower",
    "create_server",
    "main",
    "relay_limits",
    "serve",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GatewayServer(MeshServer):
    """The gateway's gRPC listener, plus the HTTPS JWKS listener when one is configured."""

    jwks_http: JwksHttpListener | None = None

    async def start(self) -> None:
        if self.jwks_http is not None:
            await self.jwks_http.start()
        await super().start()

    async def stop(self, grace: float, *, delay: float = 0.0) -> float:
        waited = await super().stop(grace, delay=delay)
        if self.jwks_http is not None:
            await self.jwks_http.stop()
        return waited


def relay_limits(settings: GatewaySettings) -> RelayLimits:
    """The Publish relay's window, resume bounds and stream age, from the settings."""
    return RelayLimits(
        window_batches=settings.publish_window_batches,
        window_bytes=settings.publish_window_bytes,
        resume_attempts=settings.publish_resume_attempts,
        resume_seconds=settings.publish_resume_seconds,
        stream_max_age=settings.publish_stream_max_age_seconds,
    )


def create_audit_trail(settings: GatewaySettings, upstreams: Upstreams) -> AuditTrail:
    """The queue of refused calls that a background task reports to auth."""
    return AuditTrail(upstreams.record_audit_event, capacity=settings.audit_queue_size)


def create_revocation_follower(
    settings: GatewaySettings, upstreams: Upstreams
) -> tuple[RevocationList, RevocationFollower]:
    """The revocation list the verifier consults and the task that keeps it current (not
    started yet: the caller starts it and closes it after the server stopped)."""
    revocations = RevocationList(
        max_staleness=settings.revocation_max_staleness_seconds,
        fail_mode=settings.revocation_fail_mode,
    )
    return revocations, RevocationFollower(upstreams.watch_revocations, revocations)


def create_server(
    settings: GatewaySettings,
    upstreams: Upstreams,
    audit: AuditTrail,
    revocations: RevocationList,
) -> GatewayServer:
    """The public listener is TLS without client certificates: callers authenticate with
    bearer tokens, which AccessGuard checks against the method table and `revocations` before
    any handler runs. The caller owns `audit` and the follower of `revocations`, and closes
    them after the server stopped."""
    keys = JwksCache(
        upstreams.fetch_jwks,
        max_age=settings.jwks_max_age_seconds,
        min_refetch=settings.jwks_min_refetch_seconds,
    )
    verifier = TokenVerifier(
        keys,
        issuer=settings.token_issuer,
        audience=settings.token_audience,
        leeway=settings.token_leeway_seconds,
        revocations=revocations,
    )
    metrics = ServiceMetrics("gateway")
    metrics.registry.register(TokenRefusalCollector(verifier.refusals, map(str, Reason)))
    mesh = create_mesh_server(
        settings,
        identity="gateway",
        metrics=metrics,
        bindings=[
            ServiceBinding(
                gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
                gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
                GatewayServicer(upstreams, keys, relay_limits(settings), revocations),
            ),
            ServiceBinding(
                schema_registry_pb2.DESCRIPTOR.services_by_name["SchemaRegistryService"],
                schema_registry_pb2_grpc.add_SchemaRegistryServiceServicer_to_server,
                SchemaRegistryServicer(upstreams),
            ),
            ServiceBinding(
                rules_pb2.DESCRIPTOR.services_by_name["RuleService"],
                rules_pb2_grpc.add_RuleServiceServicer_to_server,
                RuleServicer(upstreams, revocations),
            ),
            ServiceBinding(
                admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
                admin_pb2_grpc.add_AdminServiceServicer_to_server,
                AdminServicer(upstreams, audit),
            ),
        ],
        guard=AccessGuard(verifier, audit),
        require_client_cert=False,
    )
    jwks_http = None
    if settings.jwks_http_port is not None:
        jwks_http = JwksHttpListener(
            keys, host=settings.host, port=settings.jwks_http_port, tls_dir=settings.tls_dir
        )
    fields = {f.name: getattr(mesh, f.name) for f in dataclasses.fields(mesh)}
    return GatewayServer(**fields, jwks_http=jwks_http)


async def serve(settings: GatewaySettings) -> None:
    # Read once here so that missing or unreadable material is a StartupError, not a traceback;
    # the mesh clients read the files again when they build their channels.
    load_tls(settings.tls_dir, "gateway")
    upstreams = Upstreams(settings, TlsFiles.of(settings.tls_dir, "gateway"))
    audit = create_audit_trail(settings, upstreams)
    revocations, follower = create_revocation_follower(settings, upstreams)
    follower.start()
    # Serving before the first snapshot would refuse (fail-closed) or trust blindly (fail-open)
    # every authenticated call; auth usually answers within milliseconds.
    if not await follower.wait_live(settings.revocation_startup_wait_seconds):
        log.warning(
            "no revocation snapshot from auth after %.0fs; serving, %s until one arrives",
            settings.revocation_startup_wait_seconds,
            f"fail-{settings.revocation_fail_mode.value}",
        )
    mesh = create_server(settings, upstreams, audit, revocations)

    async def stop() -> None:
        # After the drain: the last refusals still reach auth before the channels close.
        await follower.close()
        await audit.close(timeout=settings.grace_seconds)
        await upstreams.close()

    await run_until_signalled(mesh, grace=settings.grace_seconds, on_stop=stop)


def main() -> None:
    run_service("gateway", GatewaySettings, serve)
