"""Request checks shared by the handlers: each raises INVALID_ARGUMENT naming every bad field."""

from __future__ import annotations

from collections.abc import Iterable

from services.auth.accounts import USERNAME_RULE, canonical_username
from services.auth.passwords import MAX_PASSWORD_CHARS, normalize_password, password_problem
from services.auth.roles import ROLES, unknown_roles
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.tenancy import TENANT_RULE, canonical_tenant

__all__ = [
    "display_name_argument",
    "new_account",
    "role_set",
    "tenant_argument",
    "username_argument",
]

_MAX_DISPLAY_NAME = 128


def new_account(
    username: str, password: str, *, roles: Iterable[str] | None = None
) -> tuple[str, str, list[str] | None]:
    """The canonical username, the normalized password and the roles of a new account (None
    roles when none were given), or INVALID_ARGUMENT naming each field that breaks a rule."""
    violations: list[tuple[str, str]] = []
    canonical = canonical_username(username)
    if canonical is None:
        violations.append(("username", USERNAME_RULE))
    normalized = normalize_password(password)
    problem = (
        f"must have at most {MAX_PASSWORD_CHARS} characters"
        if normalized is None
        else password_problem(normalized, username=canonical)
    )
    if problem is not None:
        violations.append(("password", problem))
    role_list = sorted(set(roles)) if roles else None
    if role_list is not None and unknown_roles(role_list):
        violations.append(("roles", _roles_rule(role_list)))
    if canonical is None or normalized is None or violations:
        raise InvalidArgument("invalid account", field_violations=violations)
    return canonical, normalized, role_list


def username_argument(username: str, field: str = "username") -> str:
    """The canonical form of a username argument."""
    canonical = canonical_username(username)
    if canonical is None:
        raise InvalidArgument("invalid username", field_violations=[(field, USERNAME_RULE)])
    return canonical


def role_set(roles: Iterable[str], field: str = "roles") -> list[str]:
    """The roles, de-duplicated and sorted; each must be a known role."""
    role_list = sorted(set(roles))
    if unknown_roles(role_list):
        raise InvalidArgument("unknown role", field_violations=[(field, _roles_rule(role_list))])
    return role_list


def _roles_rule(roles: list[str]) -> str:
    unknown = ", ".join(role[:32] for role in unknown_roles(roles)[:5])
    return f"unknown {unknown}; roles are {', '.join(sorted(ROLES))}"


def tenant_argument(tenant: str, field: str = "tenant", *, required: bool = False) -> str:
    """The canonical form of a tenant id argument; "" for an empty optional one."""
    if not tenant and not required:
        return ""
    canonical = canonical_tenant(tenant)
    if canonical is None:
        raise InvalidArgument("invalid tenant", field_violations=[(field, TENANT_RULE)])
    return canonical


def display_name_argument(name: str, default: str, field: str = "display_name") -> str:
    """A display name: 1 to 128 printable characters, surrounding blanks dropped; `default`
    when empty."""
    name = name.strip()
    if not name:
        return default
    if len(name) > _MAX_DISPLAY_NAME or not name.isprintable():
        raise InvalidArgument(
            "invalid display name",
            field_violations=[(field, f"1 to {_MAX_DISPLAY_NAME} printable characters")],
        )
    return name
