"""SPIFFE identities: every service and operator certificate carries exactly one URI SAN
`spiffe://<trust-domain>/<kind>/<name>`; authorization decisions use nothing else.

The TLS handshake (gRPC core) already refuses a client certificate that does not chain to our CA
or is outside its validity period. gRPC Python offers no hook into that verification, so the rest
of what makes a certificate an identity is checked on the peer's certificate at each call
(`peer_certificate_identity`): not a CA, exactly one URI SAN, a SPIFFE id of a known kind in our
trust domain, and still valid now (a connection outlives the handshake that checked it).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass

import grpc
from cryptography import x509

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "IDENTITY_KINDS",
    "PeerCertificateError",
    "operator_id",
    "parse_spiffe_id",
    "peer_certificate_identity",
    "peer_identity",
    "service_id",
]

DEFAULT_TRUST_DOMAIN = "streammesh.local"

IDENTITY_KINDS = ("service", "operator")
"""The kinds of identity our PKI issues: `service/<name>` and `operator/<name>`."""

_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")


class PeerCertificateError(ValueError):
    """A peer certificate that cannot stand for an identity; the message says why."""


def service_id(trust_domain: str, name: str) -> str:
    """The SPIFFE id of service `name`."""
    return f"spiffe://{trust_domain}/service/{name}"


def operator_id(trust_domain: str, name: str) -> str:
    """The SPIFFE id of operator `name` (a person's certificate, e.g. `admin`)."""
    return f"spiffe://{trust_domain}/operator/{name}"


def parse_spiffe_id(value: str) -> tuple[str, str, str]:
    """`spiffe://<domain>/<kind>/<name>` -> (domain, kind, name); ValueError says what is wrong."""
    prefix = "spiffe://"
    if not value.startswith(prefix):
        raise ValueError(f"{value!r} is not a SPIFFE id (spiffe://<trust-domain>/<kind>/<name>)")
    domain, _, path = value[len(prefix) :].partition("/")
    kind, _, name = path.partition("/")
    if not domain or kind not in IDENTITY_KINDS or not _NAME.fullmatch(name):
        raise ValueError(
            f"{value!r} is not spiffe://<trust-domain>/<kind>/<name> with kind one of "
            f"{', '.join(IDENTITY_KINDS)}"
        )
    return domain, kind, name


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The SPIFFE id of the mTLS peer, or None without a client certificate.

    gRPC core sets `peer_spiffe_id` only when the certificate has exactly one URI SAN and it is a
    well-formed SPIFFE id. Handlers use this after the guard (`PeerPolicy`), which has checked the
    whole certificate with `peer_certificate_identity`.
    """
    values = context.auth_context().get("peer_spiffe_id")
    if not values:
        return None
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Leaf:
    identity: str
    not_before: dt.datetime
    not_after: dt.datetime


@functools.lru_cache(maxsize=1024)
def _leaf(pem: bytes, trust_domain: str) -> _Leaf:
    """What does not change with time, parsed once per certificate (a peer's every call carries
    the same PEM): the identity, or the reason there is none."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise PeerCertificateError(f"the certificate does not parse: {error}") from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise PeerCertificateError("it is a CA certificate (basicConstraints CA:TRUE), not a leaf")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise PeerCertificateError(
            f"it has {len(uris)} URI SANs; exactly one, its SPIFFE id, is required"
        )
    try:
        domain, _, _ = parse_spiffe_id(uris[0])
    except ValueError as error:
        raise PeerCertificateError(str(error)) from None
    if domain != trust_domain:
        raise PeerCertificateError(
            f"its SPIFFE id {uris[0]} is not in the trust domain {trust_domain}"
        )
    return _Leaf(uris[0], cert.not_valid_before_utc, cert.not_valid_after_utc)


def peer_certificate_identity(
    context: grpc.aio.ServicerContext, trust_domain: str, *, now: dt.datetime | None = None
) -> str:
    """The SPIFFE id of the peer's certificate once every identity check passed; raises
    PeerCertificateError naming the first that failed (no certificate is one)."""
    values = context.auth_context().get("x509_pem_cert")
    if not values:
        raise PeerCertificateError("no client certificate was presented")
    leaf = _leaf(bytes(values[0]), trust_domain)
    moment = now or dt.datetime.now(dt.UTC)
    if not leaf.not_before <= moment <= leaf.not_after:
        raise PeerCertificateError(
            f"it is valid from {leaf.not_before:%Y-%m-%dT%H:%M:%SZ} "
            f"to {leaf.not_after:%Y-%m-%dT%H:%M:%SZ} only"
        )
    return leaf.identity
