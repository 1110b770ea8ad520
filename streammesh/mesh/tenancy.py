"""The tenant a call is made for, as it travels from the gateway to the internal services.

Every user belongs to one tenant, and the access token says which (the `tenant` claim). The
gateway puts that tenant on every internal call it makes for a verified caller, as the metadata
entry `x-streammesh-tenant`, next to `x-streammesh-actor`. An internal service reads it with
`caller_tenant()`, which believes the entry only from the gateway's mTLS identity (and from an
operator certificate, which holds the whole PKI anyway): any other peer that sends it is
refused, so a compromised processor or ingest cannot act for a tenant it names.

Metadata rather than a field in each internal request: the tenant is who the call is for, like
the actor, not what it asks; one entry covers unary calls and streams alike (a Publish stream
has one tenant, not one per message); and the internal messages stay wire-identical to their
public twins, which the gateway relays by re-parsing bytes.
"""

from __future__ import annotations

import re

import grpc

from streammesh.mesh.errors import InvalidArgument, PermissionDenied
from streammesh.mesh.identity import peer_identity, service_id

__all__ = [
    "DEFAULT_TENANT",
    "TENANT_METADATA",
    "TENANT_RULE",
    "caller_tenant",
    "canonical_tenant",
    "tenant_metadata",
]

DEFAULT_TENANT = "default"
"""The tenant of accounts made before tenants existed, of self-registered accounts and of the
platform administrators."""
TENANT_METADATA = "x-streammesh-tenant"
TENANT_RULE = "2 to 32 characters: a-z, 0-9 and '-', starting with a letter"
_TENANT = re.compile(r"[a-z][a-z0-9-]{1,31}")


def canonical_tenant(tenant: str) -> str | None:
    """The stored (lower-case) form of a well-formed tenant id, or None if it breaks the rule."""
    lowered = tenant.lower()
    return lowered if _TENANT.fullmatch(lowered) else None


def tenant_metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    """The metadata entry that names `tenant` on an internal call (the gateway's side)."""
    return ((TENANT_METADATA, tenant),)


def caller_tenant(context: grpc.aio.ServicerContext, *, trust_domain: str) -> str | None:
    """The tenant the current call is made for, or None when the caller named none (the
    gateway always names one for a verified caller; calls it makes for itself name none).

    INVALID_ARGUMENT for a malformed or repeated entry; PERMISSION_DENIED when a peer other
    than the gateway or an operator sends one.
    """
    values = [
        value for key, value in (context.invocation_metadata() or ()) if key == TENANT_METADATA
    ]
    if not values:
        return None
    identity = peer_identity(context) or ""
    if identity != service_id(trust_domain, "gateway") and not identity.startswith(
        f"spiffe://{trust_domain}/operator/"
    ):
        raise PermissionDenied(f"only the gateway may name a tenant ({TENANT_METADATA})")
    tenant = canonical_tenant(values[0]) if isinstance(values[0], str) else None
    if len(values) > 1 or tenant is None:
        raise InvalidArgument(
            "malformed caller metadata", field_violations=[(TENANT_METADATA, TENANT_RULE)]
        )
    return tenant
