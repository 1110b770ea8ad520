"""Default-deny authorization of mTLS peers: which identity may call which method.

The rules are data, declared in the policy file (streammesh/mesh/policy.toml, see
streammesh.mesh.policy_file) and loaded by each internal service at start with
`PeerPolicy.load`. A method matched by no rule is refused with PERMISSION_DENIED, so a new RPC is
unreachable until someone writes down who may call it; no identity, the operator's included, is
allowed anything a rule does not name.

Each call is checked in two steps: the peer's certificate must stand for an identity (see
streammesh.mesh.identity: not a CA, one URI SAN, our trust domain, valid now), else
UNAUTHENTICATED; then that identity must be allowed the method, else PERMISSION_DENIED. Both
refusals are logged (rate-limited, no traceback: they are the caller's mistake) and counted in a
`DenialCounter`, whose hooks a metrics exporter can subscribe to.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import grpc

from streammesh.mesh.errors import PermissionDenied, Unauthenticated
from streammesh.mesh.identity import PeerCertificateError, peer_certificate_identity
from streammesh.mesh.logs import LogThrottle
from streammesh.mesh.policy_file import (
    ANY_PEER,
    EVERY_SERVICE,
    PolicyFileError,
    load_policy_file,
    resolve_rules,
)
from streammesh.mesh.settings import ServiceSettings
from streammesh.mesh.startup import StartupError

__all__ = [
    "ANY_PEER",
    "CERTIFICATE_REFUSED",
    "PEER_NOT_ALLOWED",
    "DenialCounter",
    "DenialHook",
    "PeerPolicy",
]

log = logging.getLogger(__name__)

PEER_NOT_ALLOWED = "PEER_NOT_ALLOWED"
"""ErrorInfo reason (and counter reason) of a call the policy does not grant to its caller."""
CERTIFICATE_REFUSED = "PEER_CERTIFICATE_REFUSED"
"""ErrorInfo reason (and counter reason) of a peer certificate that is no valid identity."""

DenialHook = Callable[[str, str, str], None]
"""Called with (method, identity or "" when the certificate was refused, reason) per denial."""


class DenialCounter:
    """Refused calls counted by (method, identity, reason); `hooks` see each one as it happens
    (a Prometheus counter's `labels(...).inc()` fits)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.hooks: list[DenialHook] = []

    def record(self, method: str, identity: str, reason: str) -> None:
        """Count one denial and tell the hooks."""
        self.counts[(method, identity, reason)] += 1
        for hook in self.hooks:
            hook(method, identity, reason)

    def total(self, *, method: str | None = None, identity: str | None = None) -> int:
        """Denials so far, optionally only of `method` and/or of `identity`."""
        return sum(
            count
            for (seen_method, seen_identity, _), count in self.counts.items()
            if method in (None, seen_method) and identity in (None, seen_identity)
        )


class PeerPolicy:
    """The guard of an internal listener: `rules` maps `pkg.Service/Method` or `pkg.Service/*` to
    the SPIFFE ids allowed to call it (or ANY_PEER)."""

    def __init__(
        self,
        rules: Mapping[str, frozenset[str]],
        *,
        trust_domain: str,
        denials: DenialCounter | None = None,
        throttle: LogThrottle | None = None,
    ) -> None:
        self.rules = dict(rules)
        self.trust_domain = trust_domain
        self.denials = denials or DenialCounter()
        self._throttle = throttle or LogThrottle(log)

    @classmethod
    def load(
        cls,
        settings: ServiceSettings,
        destination: str,
        *,
        policy_file: Path | None = None,
        denials: DenialCounter | None = None,
    ) -> PeerPolicy:
        """The rules for `destination` (e.g. "storage") from the policy file the settings name
        (default: the shipped one); an invalid file is a StartupError naming the entry."""
        path = policy_file or settings.policy_file
        try:
            policy = load_policy_file(path, trust_domain=settings.trust_domain)
        except PolicyFileError as error:
            raise StartupError(f"invalid peer policy: {error}") from None
        uncovered = policy.uncovered(destination)
        if uncovered:
            # Refused anyway (default deny), but nobody decided so: worth a line at start.
            log.warning(
                "the peer policy %s neither allows nor denies %s; refused by default",
                policy.path,
                ", ".join(uncovered),
            )
        return cls(
            policy.rules_for(destination), trust_domain=settings.trust_domain, denials=denials
        )

    @classmethod
    def build(cls, trust_domain: str, rules: Mapping[str, Iterable[str]]) -> PeerPolicy:
        """A policy written in code (tests, tools): `rules` name peers as the file does
        (`service/<name>`, `operator/<name>`, SPIFFE ids, ANY_PEER) and get the shipped file's
        rules for every listener (health, reflection) besides. Nothing else is implied."""
        shipped = load_policy_file(None, trust_domain=trust_domain)
        table = {**shipped.rules_for(EVERY_SERVICE), **resolve_rules(trust_domain, rules)}
        return cls(table, trust_domain=trust_domain)

    def allowed(self, method: str) -> frozenset[str]:
        """Identities allowed to call `/pkg.Service/Method` (empty when no rule names it)."""
        service, _, name = method.lstrip("/").partition("/")
        exact = self.rules.get(f"{service}/{name}", frozenset())
        return exact | self.rules.get(f"{service}/*", frozenset())

    def _refuse(self, method: str, identity: str, reason: str, message: str) -> None:
        self.denials.record(method, identity, reason)
        self._throttle.warning("refused %s: %s", method, message)

    async def __call__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Guard: refuse the call unless the peer's certificate is a valid identity that is
        allowed `method`."""
        try:
            identity = peer_certificate_identity(context, self.trust_domain)
        except PeerCertificateError as error:
            message = f"the client certificate is refused: {error}"
            self._refuse(method, "", CERTIFICATE_REFUSED, f"{message} (peer {context.peer()})")
            raise Unauthenticated(message, error_reason=CERTIFICATE_REFUSED) from None
        allowed = self.allowed(method)
        if identity not in allowed and ANY_PEER not in allowed:
            message = f"{identity} may not call {method} (not granted by the peer policy)"
            self._refuse(method, identity, PEER_NOT_ALLOWED, message)
            raise PermissionDenied(message, error_reason=PEER_NOT_ALLOWED)
