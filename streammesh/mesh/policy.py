"""Declarative, default-deny authorization of mTLS peers: which identity may call which method.

A policy is data: a mapping from method patterns to the identities allowed to call them, declared
next to each service's wiring. A method matched by no rule is refused with PERMISSION_DENIED, so a
new RPC is unreachable until someone writes down who may call it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc

from streammesh.mesh.errors import PermissionDenied, Unauthenticated
from streammesh.mesh.identity import operator_id, peer_identity, service_id

__all__ = ["ANY_PEER", "PeerPolicy", "infrastructure_rules"]

ANY_PEER = "*"
"""Any peer whose certificate chains to our CA (health checks, reflection)."""


def infrastructure_rules() -> dict[str, tuple[str, ...]]:
    """Health and reflection are open to every authenticated peer: grpcurl and load balancers."""
    return {
        "grpc.health.v1.Health/*": (ANY_PEER,),
        "grpc.reflection.v1alpha.ServerReflection/*": (ANY_PEER,),
        "grpc.reflection.v1.ServerReflection/*": (ANY_PEER,),
    }


@dataclass(frozen=True)
class PeerPolicy:
    """`rules` maps `pkg.Service/Method` or `pkg.Service/*` to allowed SPIFFE ids (or ANY_PEER)."""

    rules: Mapping[str, frozenset[str]]

    @classmethod
    def build(
        cls,
        trust_domain: str,
        rules: Mapping[str, Iterable[str]],
        *,
        operators: Iterable[str] = ("admin",),
    ) -> PeerPolicy:
        """Rules name peers as `service/<name>` or `operator/<name>`; operators may call anything
        a rule names, so an admin can reach every declared method with grpcurl."""

        def resolve(peer: str) -> str:
            if peer == ANY_PEER:
                return peer
            kind, _, name = peer.partition("/")
            if kind == "service":
                return service_id(trust_domain, name)
            if kind == "operator":
                return operator_id(trust_domain, name)
            raise ValueError(f"peer {peer!r} is not service/<name> or operator/<name>")

        admins = {operator_id(trust_domain, name) for name in operators}
        table = {**infrastructure_rules(), **{k: tuple(v) for k, v in rules.items()}}
        return cls(
            {pattern: frozenset(map(resolve, peers)) | admins for pattern, peers in table.items()}
        )

    def allowed(self, method: str) -> frozenset[str]:
        """Identities allowed to call `/pkg.Service/Method` (empty when no rule names it)."""
        service, _, name = method.lstrip("/").partition("/")
        exact = self.rules.get(f"{service}/{name}")
        if exact is not None:
            return exact
        return self.rules.get(f"{service}/*", frozenset())

    async def __call__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Guard: refuse the call unless the peer's identity is allowed for `method`."""
        identity = peer_identity(context)
        if identity is None:
            raise Unauthenticated("a client certificate with a SPIFFE id is required")
        allowed = self.allowed(method)
        if identity not in allowed and ANY_PEER not in allowed:
            raise PermissionDenied(f"{identity} may not call {method}")
