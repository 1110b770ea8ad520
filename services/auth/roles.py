"""The roles a StreamMesh user can hold. The gateway maps methods to these names.

`admin` is the platform administrator: tenants, every tenant's users, signing keys, the whole
audit log and dead letters. It keeps the name it had before tenants existed (so existing admins,
their tokens and scripts keep working), and only users of tenant "default" may hold it.
`tenant-admin` administers the users of its own tenant and reads its tenant's audit log.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PLATFORM_ADMIN", "ROLES", "TENANT_ADMIN", "unknown_roles"]

PLATFORM_ADMIN = "admin"
TENANT_ADMIN = "tenant-admin"
ROLES = frozenset(
    {PLATFORM_ADMIN, TENANT_ADMIN, "producer", "analyst", "schema-admin", "rule-admin"}
)


def unknown_roles(roles: Iterable[str]) -> list[str]:
    """The names in `roles` that are not roles, sorted (empty when all are known)."""
    return sorted(set(roles) - ROLES)
