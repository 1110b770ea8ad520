"""Which tenants an administration call may act on: the caller's scope.

A platform admin (role `admin`, only ever held in tenant "default") and an operator (the admin
certificate) act on every tenant; a tenant admin (role `tenant-admin`) on its own tenant only.
Auth decides from its own rows, not from the token's roles: the gateway names the caller
(`x-streammesh-actor`) and the caller's tenant (`x-streammesh-tenant`), and auth reads that
user's roles and state, so a demoted or disabled admin loses the power at once.

A call from the gateway without a tenant comes from a gateway that predates tenants (a rolling
upgrade), whose users all live in "default": its caller is looked up there and must hold the
role itself, as for any other call. The missing entry grants nothing (default deny); a current
gateway names the tenant on every call it makes for a verified caller.

Another tenant, and a tenant that does not exist, look the same to a tenant admin: NOT_FOUND
"no such tenant" (audited with the same reason), so it cannot learn which tenants exist.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.auth.origin import Origin
from services.auth.roles import PLATFORM_ADMIN, TENANT_ADMIN
from services.auth.store import AuthStore
from services.auth.tenants import TenantStore
from streammesh.mesh.errors import NotFound, PermissionDenied
from streammesh.mesh.tenancy import DEFAULT_TENANT

__all__ = ["NO_SUCH_TENANT", "Scope", "scope_of"]

NO_SUCH_TENANT = "no such tenant"


@dataclass(frozen=True)
class Scope:
    """The caller's own tenant, and whether it may act on every tenant."""

    tenant: str
    platform: bool

    async def target(self, requested: str, tenants: TenantStore) -> str:
        """The tenant a call acts on: `requested` (canonical), or the caller's own when empty.
        NotFound when the caller may not see it or it does not exist: the same answer."""
        tenant = requested or self.tenant
        if tenant == self.tenant:
            return tenant
        if not self.platform or await tenants.get(tenant) is None:
            raise NotFound(NO_SUCH_TENANT)
        return tenant


async def scope_of(origin: Origin, store: AuthStore) -> Scope:
    """The scope of the administrator `origin` names; PERMISSION_DENIED for anyone else."""
    if origin.actor.startswith("operator:"):
        return Scope(origin.tenant or DEFAULT_TENANT, platform=True)
    # No tenant: a gateway that predates tenants (see the module docstring).
    tenant = origin.tenant or DEFAULT_TENANT
    kind, _, username = origin.actor.partition(":")
    user = await store.get_user(username, tenant=tenant) if kind == "user" else None
    if user is not None and not user.disabled and not user.tenant_disabled:
        if PLATFORM_ADMIN in user.roles and user.tenant == DEFAULT_TENANT:
            return Scope(user.tenant, platform=True)
        if TENANT_ADMIN in user.roles:
            return Scope(user.tenant, platform=False)
    raise PermissionDenied("administration needs an administrator")
