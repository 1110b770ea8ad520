"""The roles a StreamMesh user can hold. The gateway maps methods to these names."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ROLES", "unknown_roles"]

ROLES = frozenset({"admin", "producer", "analyst", "schema-admin"})


def unknown_roles(roles: Iterable[str]) -> list[str]:
    """The names in `roles` that are not roles, sorted (empty when all are known)."""
    return sorted(set(roles) - ROLES)
