"""SPIFFE identities: every service and operator certificate carries exactly one URI SAN
`spiffe://<trust-domain>/<kind>/<name>`; authorization decisions use nothing else."""

from __future__ import annotations

import grpc

__all__ = ["DEFAULT_TRUST_DOMAIN", "operator_id", "peer_identity", "service_id"]

DEFAULT_TRUST_DOMAIN = "streammesh.local"


def service_id(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/service/{name}"


def operator_id(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/operator/{name}"


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The verified SPIFFE id of the mTLS peer, or None without a client certificate.

    gRPC core sets `peer_spiffe_id` only when the certificate has exactly one URI SAN and it is a
    well-formed SPIFFE id, which is the invariant our PKI keeps.
    """
    values = context.auth_context().get("peer_spiffe_id")
    if not values:
        return None
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)
