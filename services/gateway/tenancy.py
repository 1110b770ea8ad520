"""The tenant a call works in, from its verified principal: the one place the gateway decides
it, so every internal request carries the same value."""

from __future__ import annotations

from services.gateway.tokens import Principal

__all__ = ["DEFAULT_TENANT", "principal_tenant"]

DEFAULT_TENANT = "default"
"""The tenant of a principal whose token names none (every token, until tokens carry one)."""


def principal_tenant(principal: Principal) -> str:
    """The caller's tenant. Tokens do not carry a tenant yet: everyone is in DEFAULT_TENANT.
    When Principal gains a `tenant`, this returns it (and still DEFAULT_TENANT when empty)."""
    tenant: object = getattr(principal, "tenant", "")
    return tenant if isinstance(tenant, str) and tenant else DEFAULT_TENANT
