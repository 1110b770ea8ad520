"""Who a call is on behalf of, and from where: the actor and source of audit rows and throttling.

The gateway calls auth for people and names them in metadata: `x-streammesh-actor` ("user:ada",
"anonymous") and `x-streammesh-source` (the client address it saw). That metadata is believed
only when the verified mTLS peer is the gateway. An operator (admin certificate, e.g. grpcurl)
is the actor itself, "operator:<name>" from its certificate, and its source is its own address.

For a verified caller the gateway also sends `x-streammesh-tenant`, the tenant of the caller's
token (see streammesh.mesh.tenancy); it becomes the origin's tenant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import unquote

import grpc

from services.auth.audit import ACTOR_PATTERN, AuditEvent
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.identity import peer_identity
from streammesh.mesh.tenancy import caller_tenant

__all__ = ["ACTOR_METADATA", "SOURCE_METADATA", "SYSTEM", "Origin", "origin_of", "peer_host"]

ACTOR_METADATA = "x-streammesh-actor"
SOURCE_METADATA = "x-streammesh-source"
_SOURCE = re.compile(r"[\x21-\x7e]{1,128}")
# gRPC peer strings ("ipv4:10.0.0.5:4431", "ipv6:[::1]:4431") and plain "host:port" forms.
_PEER = re.compile(
    r"(?:ipv4:)?(?P<v4>\d{1,3}(?:\.\d{1,3}){3})(?::\d+)?"
    r"|(?:ipv6:)?\[(?P<v6>[0-9a-fA-F:.%]+)\](?::\d+)?"
)


@dataclass(frozen=True)
class Origin:
    """The actor ("user:ada", "operator:admin", "anonymous", ...), the client address, and the
    actor's tenant when known (a verified caller's, as the gateway names it)."""

    actor: str
    source: str
    tenant: str | None = None

    def within(self, tenant: str) -> Origin:
        """The same origin, its events in `tenant` (the account flows: the tenant they name)."""
        return replace(self, tenant=tenant)

    def event(
        self,
        action: str,
        outcome: str,
        *,
        subject: str = "",
        reason: str = "",
        details: Mapping[str, str] | None = None,
        tenant: str | None = None,
    ) -> AuditEvent:
        """An audit event of this origin, in `tenant` (default: the actor's, if known)."""
        return AuditEvent(
            tenant=tenant if tenant is not None else self.tenant or "",
            actor=self.actor,
            action=action,
            outcome=outcome,
            subject=subject,
            reason=reason,
            source=self.source,
            details=dict(details or {}),
        )


SYSTEM = Origin(actor="service:auth", source="")
"""Events auth causes on its own (scheduled key rotation)."""


def peer_host(peer: str) -> str:
    """The address part of a peer ("ipv4:10.0.0.5:4431" -> "10.0.0.5"); other text as is."""
    # gRPC writes IPv6 peers URL-encoded: "ipv6:%5B::1%5D:4431".
    match = _PEER.fullmatch(unquote(peer))
    if match is None:
        return peer
    return match["v4"] or match["v6"]


def origin_of(context: grpc.aio.ServicerContext, *, trust_domain: str) -> Origin:
    """The origin of the current call (see the module docstring)."""
    identity = peer_identity(context) or ""
    kind, _, name = identity.removeprefix(f"spiffe://{trust_domain}/").partition("/")
    peer_address = peer_host(context.peer() or "")
    tenant = caller_tenant(context, trust_domain=trust_domain)
    if kind == "operator":
        return Origin(actor=f"operator:{name}", source=peer_address, tenant=tenant)
    if kind != "service" or name != "gateway":
        return Origin(
            actor=f"service:{name}" if kind == "service" else "anonymous", source=peer_address
        )
    metadata = {
        key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
    }
    actor = metadata.get(ACTOR_METADATA, "service:gateway").strip().lower()
    if not ACTOR_PATTERN.fullmatch(actor):
        raise InvalidArgument(
            "malformed caller metadata",
            field_violations=[(ACTOR_METADATA, "anonymous, user:<name> or service:<name>")],
        )
    source = metadata.get(SOURCE_METADATA)
    if source is None:
        # Without the client's address every caller shares the gateway's throttling bucket:
        # stricter than per-client, never looser.
        return Origin(actor=actor, source=peer_address, tenant=tenant)
    source = source.strip()
    if not _SOURCE.fullmatch(source):
        raise InvalidArgument(
            "malformed caller metadata",
            field_violations=[(SOURCE_METADATA, "1 to 128 printable ASCII characters")],
        )
    return Origin(actor=actor, source=peer_host(source), tenant=tenant)
