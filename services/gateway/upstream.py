"""The gateway's channels to the internal services, and how their failures reach clients.

Every call to auth carries `x-streammesh-actor` (`user:<username>` of a verified token, else
`anonymous`; `service:gateway` for the gateway's own JWKS fetches) and `x-streammesh-source` (the
client's IP address as the gateway saw it, without the port). Auth trusts them only from the
gateway's mTLS identity, and uses them to audit and to throttle per source.

Every call made for a verified caller, to any service, also carries `x-streammesh-tenant`, the
tenant of the caller's token (streammesh.mesh.tenancy; services read it with `caller_tenant`).
The gateway's calls for itself (JWKS, the revocation feed, the audit trail) name no tenant.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from urllib.parse import unquote

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.gateway.settings import GatewaySettings
from streammesh.api.auth.v1 import auth_pb2, auth_pb2_grpc
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.api.storage.v1 import (
    definitions_pb2,
    definitions_pb2_grpc,
    schema_registry_pb2,
    schema_registry_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
)
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles, parse_targets
from streammesh.mesh.errors import from_rpc_error
from streammesh.mesh.tenancy import tenant_metadata

__all__ = [
    "ACTOR_HEADER",
    "ANONYMOUS",
    "GATEWAY_ACTOR",
    "GATEWAY_SOURCE",
    "SOURCE_HEADER",
    "Metadata",
    "Upstreams",
    "caller_metadata",
    "client_address",
    "upstream_errors",
]

AUTH = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
INGEST = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
STORAGE = storage_pb2.DESCRIPTOR.services_by_name["StorageService"]
REGISTRY = schema_registry_pb2.DESCRIPTOR.services_by_name["SchemaRegistryService"]
DEFINITIONS = definitions_pb2.DESCRIPTOR.services_by_name["DefinitionService"]

ACTOR_HEADER = "x-streammesh-actor"
SOURCE_HEADER = "x-streammesh-source"
ANONYMOUS = "anonymous"
"""The actor of a call without a verified token."""
GATEWAY_ACTOR = "service:gateway"
GATEWAY_SOURCE = "gateway"
"""Actor and source of calls the gateway makes for itself (JWKS), not for one client."""

Metadata = tuple[tuple[str, str], ...]


def client_address(peer: str | None) -> str:
    """The client's IP address from grpc's peer string (`ipv4:1.2.3.4:5678`,
    `ipv6:%5B::1%5D:5678`), without the port: every new connection has a new port, so a source
    that kept it could never be throttled. Anything else (unix sockets) is kept as it is."""
    if not peer:
        return ""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return peer
    host = unquote(rest).rpartition(":")[0].strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return peer


def caller_metadata(actor: str, source: str, tenant: str | None = None) -> Metadata:
    """The metadata auth reads to know on whose behalf, from where, and for which tenant a call
    comes. Without a known source the header is left out: auth then uses the gateway's own
    address, a bucket every such caller shares (stricter, never looser)."""
    metadata: Metadata = ((ACTOR_HEADER, actor),)
    if source:
        metadata += ((SOURCE_HEADER, source),)
    if tenant is not None:
        metadata += tenant_metadata(tenant)
    return metadata


@contextmanager
def upstream_errors(service: str) -> Iterator[None]:
    """Give the client the upstream's status (client errors pass through; internal ones become
    UNAVAILABLE without detail)."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, service=service) from error


class Upstreams:
    """One mesh client per internal service; each balances over that service's replicas and
    retries what the protos declare safe to retry (streammesh.mesh.derived_config)."""

    def __init__(self, settings: GatewaySettings, tls: TlsFiles) -> None:
        def client(
            target: str,
            name: str,
            services: tuple[ServiceDescriptor, ...],
            method_timeouts: dict[str, float] | None = None,
        ) -> MeshClient:
            return MeshClient(
                MeshClientConfig(
                    server_name=name,
                    targets=parse_targets(target),
                    tls=tls,
                    services=services,
                    timeout_seconds=settings.upstream_timeout_seconds,
                    method_timeouts=method_timeouts or {},
                    max_message_bytes=settings.max_message_bytes,
                    max_in_flight=settings.upstream_max_in_flight,
                    tls_reload_seconds=settings.tls_reload_seconds,
                )
            )

        self.clients = (
            client(
                settings.auth_target,
                "auth",
                (AUTH,),
                # An audit event waits in a bounded queue behind this call: a slow auth must
                # not hold it for the default upstream timeout.
                {f"{AUTH.full_name}/RecordAuditEvent": settings.audit_timeout_seconds},
            ),
            client(settings.ingest_target, "ingest", (INGEST,)),
            # One channel to storage's replicas for the three services they host.
            client(settings.storage_target, "storage", (STORAGE, REGISTRY, DEFINITIONS)),
        )
        """The mesh clients to auth, ingest and storage."""
        auth, ingest, storage = self.clients
        self.auth = auth.stub(auth_pb2_grpc.AuthServiceStub)
        self.ingest = ingest.stub(ingest_pb2_grpc.IngestServiceStub)
        self.storage = storage.stub(storage_pb2_grpc.StorageServiceStub)
        self.registry = storage.stub(schema_registry_pb2_grpc.SchemaRegistryServiceStub)
        self.definitions = storage.stub(definitions_pb2_grpc.DefinitionServiceStub)

    async def fetch_jwks(self) -> list[auth_pb2.JsonWebKey]:
        """Auth's published keys. Fetched for every client at once, so on the gateway's own
        behalf: one client's address would be the wrong one to throttle."""
        with upstream_errors("auth"):
            reply = await self.auth.GetJwks(
                auth_pb2.GetJwksRequest(), metadata=caller_metadata(GATEWAY_ACTOR, GATEWAY_SOURCE)
            )
        return list(reply.keys)

    async def watch_revocations(
        self, cursor: str
    ) -> AsyncIterator[auth_pb2.WatchRevocationsResponse]:
        """Auth's revocation feed from `cursor` on, until it breaks (a StreamMeshError)."""
        call = self.auth.WatchRevocations(
            auth_pb2.WatchRevocationsRequest(cursor=cursor),
            metadata=caller_metadata(GATEWAY_ACTOR, GATEWAY_SOURCE),
        )
        try:
            with upstream_errors("auth"):
                async for response in call:
                    yield response
        finally:
            call.cancel()

    async def record_audit_event(self, event: auth_pb2.AuditEvent) -> None:
        """Store one edge audit event at auth; raises grpc.aio.AioRpcError when auth refuses
        or cannot be reached (the audit trail counts it as dropped)."""
        await self.auth.RecordAuditEvent(
            auth_pb2.RecordAuditEventRequest(event=event),
            metadata=caller_metadata(event.actor or ANONYMOUS, event.source),
        )

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
