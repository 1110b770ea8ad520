"""Who may call which gateway method: a declared table, default deny.

Account calls are public (they are how a person gets a token); every other method names the
roles that may call it. Administration has two levels: PLATFORM methods (tenants, signing keys)
are for the platform admin (role `admin`, which counts only in tenant "default";
see tokens.Principal), TENANT_ADMINS methods (a tenant's users, audit log and dead letters) also for a tenant
admin (`tenant-admin`), whom auth then confines to its own tenant. A method missing from the
table is refused for everyone. Every refusal is reported to the audit trail.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from services.gateway.audit import ACCESS_DENIED, TOKEN_INVALID, AuditTrail, refusal
from services.gateway.tokens import (
    MAX_TOKEN_CHARS,
    PLATFORM_ADMIN_ROLE,
    Principal,
    Reason,
    TokenRejected,
    TokenVerifier,
)
from services.gateway.upstream import ANONYMOUS, client_address
from streammesh.mesh.errors import PermissionDenied, StreamMeshError

__all__ = [
    "ADMIN",
    "GATEWAY",
    "METHOD_ACCESS",
    "NOT_EXPOSED",
    "PLATFORM",
    "ROLE_MISSING",
    "RULES",
    "SCHEMAS",
    "TENANT_ADMINS",
    "Access",
    "AccessGuard",
    "current_principal",
    "optional_principal",
]

GATEWAY = "streammesh.gateway.v1.GatewayService"
ADMIN = "streammesh.gateway.v1.AdminService"
ADMIN_ROLE = PLATFORM_ADMIN_ROLE
TENANT_ADMIN_ROLE = "tenant-admin"
SCHEMAS = "streammesh.gateway.v1.SchemaRegistryService"
RULES = "streammesh.gateway.v1.RuleService"
ROLE_MISSING = "role_missing"
NOT_EXPOSED = "method_not_exposed"
_AUTHORIZATION = "authorization"
_MAX_AUTHORIZATION_CHARS = MAX_TOKEN_CHARS + 64
"""The scheme, spaces and the longest token accepted."""


@dataclass(frozen=True)
class Access:
    public: bool = False
    roles: frozenset[str] = frozenset()


PUBLIC = Access(public=True)
PLATFORM = Access(roles=frozenset({ADMIN_ROLE}))
"""The platform admin only."""
TENANT_ADMINS = Access(roles=frozenset({ADMIN_ROLE, TENANT_ADMIN_ROLE}))
"""A platform admin, or a tenant admin within its tenant (auth enforces the tenant)."""


def roles(*names: str) -> Access:
    """Callable by a token carrying any of `names` (platform admins may call every role-guarded
    method; a tenant admin only what its other roles allow)."""
    return Access(roles=frozenset({*names, ADMIN_ROLE}))


METHOD_ACCESS: Mapping[str, Access] = {
    f"{GATEWAY}/Register": PUBLIC,
    f"{GATEWAY}/BeginTotpEnrollment": PUBLIC,
    f"{GATEWAY}/ConfirmTotpEnrollment": PUBLIC,
    f"{GATEWAY}/StartLogin": PUBLIC,
    f"{GATEWAY}/CompleteLogin": PUBLIC,
    # The refresh token in the request is the credential; auth checks it.
    f"{GATEWAY}/RefreshSession": PUBLIC,
    f"{GATEWAY}/Logout": PUBLIC,
    f"{GATEWAY}/Publish": roles("producer"),
    f"{GATEWAY}/PublishBatch": roles("producer"),
    f"{GATEWAY}/QueryEvents": roles("analyst"),
    f"{GATEWAY}/SubscribeEvents": roles("analyst"),
    f"{GATEWAY}/CountEvents": roles("analyst"),
    f"{GATEWAY}/AggregateEvents": roles("analyst"),
    # Public keys, for resource servers outside the mesh; served from the gateway's key cache,
    # so anonymous callers cannot make it fetch from auth more often than it does anyway.
    f"{GATEWAY}/GetJwks": PUBLIC,
    # Schemas: whoever publishes or reads events may read them (a producer's CI checks a
    # candidate); changing them is for schema-admin (and admin).
    f"{SCHEMAS}/GetSchema": roles("producer", "analyst", "schema-admin"),
    f"{SCHEMAS}/ListSubjects": roles("producer", "analyst", "schema-admin"),
    f"{SCHEMAS}/ListSchemaVersions": roles("producer", "analyst", "schema-admin"),
    f"{SCHEMAS}/CheckCompatibility": roles("producer", "analyst", "schema-admin"),
    f"{SCHEMAS}/GetSchemaPolicy": roles("producer", "analyst", "schema-admin"),
    f"{SCHEMAS}/RegisterSchema": roles("schema-admin"),
    f"{SCHEMAS}/SetCompatibility": roles("schema-admin"),
    f"{SCHEMAS}/SetSchemaPolicy": roles("schema-admin"),
    # Rules and windows: a role of their own (rule-admin), not schema-admin's: a rule decides
    # what alerts and results a tenant gets, a schema what events it accepts, and the two are
    # often different people. Analysts read definitions, alerts and results.
    f"{RULES}/CreateRule": roles("rule-admin"),
    f"{RULES}/UpdateRule": roles("rule-admin"),
    f"{RULES}/SetRuleEnabled": roles("rule-admin"),
    f"{RULES}/GetRule": roles("analyst", "rule-admin"),
    f"{RULES}/ListRules": roles("analyst", "rule-admin"),
    f"{RULES}/CreateWindow": roles("rule-admin"),
    f"{RULES}/UpdateWindow": roles("rule-admin"),
    f"{RULES}/SetWindowEnabled": roles("rule-admin"),
    f"{RULES}/GetWindow": roles("analyst", "rule-admin"),
    f"{RULES}/ListWindows": roles("analyst", "rule-admin"),
    f"{RULES}/ListAlerts": roles("analyst", "rule-admin"),
    f"{RULES}/SubscribeAlerts": roles("analyst", "rule-admin"),
    f"{RULES}/SubscribeWindowResults": roles("analyst", "rule-admin"),
    f"{RULES}/ListWindowResults": roles("analyst", "rule-admin"),
    f"{RULES}/ListLateEvents": roles("analyst", "rule-admin"),
    # Each admin method is named on its own: a new one stays refused until declared here.
    f"{ADMIN}/ListUsers": TENANT_ADMINS,
    f"{ADMIN}/CreateUser": TENANT_ADMINS,
    f"{ADMIN}/SetUserDisabled": TENANT_ADMINS,
    f"{ADMIN}/SetUserRoles": TENANT_ADMINS,
    f"{ADMIN}/ResetMfa": TENANT_ADMINS,
    f"{ADMIN}/UnlockUser": TENANT_ADMINS,
    f"{ADMIN}/RevokeSessions": TENANT_ADMINS,
    f"{ADMIN}/ListAuditEvents": TENANT_ADMINS,
    f"{ADMIN}/ListSigningKeys": PLATFORM,
    f"{ADMIN}/RotateSigningKey": PLATFORM,
    f"{ADMIN}/RetireSigningKey": PLATFORM,
    # Dead letters belong to the tenant of their events, and storage scopes every call to the
    # caller's tenant: a tenant admin sees and replays its own, a platform admin those of
    # "default" (its tenant, which also holds the entries whose tenant could not be read).
    f"{ADMIN}/ListDeadLetters": TENANT_ADMINS,
    f"{ADMIN}/GetDeadLetter": TENANT_ADMINS,
    f"{ADMIN}/ReplayDeadLetter": TENANT_ADMINS,
    f"{ADMIN}/CreateTenant": PLATFORM,
    f"{ADMIN}/ListTenants": PLATFORM,
    f"{ADMIN}/GetTenant": PLATFORM,
    f"{ADMIN}/SetTenantDisabled": PLATFORM,
    "grpc.health.v1.Health/*": PUBLIC,
    "grpc.reflection.v1alpha.ServerReflection/*": PUBLIC,
    "grpc.reflection.v1.ServerReflection/*": PUBLIC,
}

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "principal", default=None
)


def optional_principal() -> Principal | None:
    """The verified caller of the current request, or None on a public method."""
    return _principal.get()


def current_principal() -> Principal:
    """The verified caller of the current request (set by AccessGuard before the handler of
    every role-guarded method)."""
    principal = _principal.get()
    if principal is None:
        raise LookupError("no verified caller: the method is not role-guarded")
    return principal


def lookup(table: Mapping[str, Access], method: str) -> Access | None:
    """The rule for `/pkg.Service/Method`: the exact entry, else the service's `*` entry."""
    service, _, name = method.lstrip("/").partition("/")
    return table.get(f"{service}/{name}") or table.get(f"{service}/*")


def bearer_token(context: grpc.aio.ServicerContext) -> str:
    """The token of the one `authorization: Bearer` header; its length is checked before any
    other work so a huge header costs nothing more."""
    values = [value for key, value in context.invocation_metadata() or () if key == _AUTHORIZATION]
    if not values:
        raise TokenRejected(Reason.MISSING_TOKEN)
    if len(values) > 1:
        raise TokenRejected(Reason.MALFORMED)
    value = values[0]
    if len(value) > _MAX_AUTHORIZATION_CHARS:
        raise TokenRejected(Reason.OVERSIZE)
    if not isinstance(value, str):
        raise TokenRejected(Reason.MALFORMED)
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        raise TokenRejected(Reason.MALFORMED)
    token = token.strip()
    if not token:
        raise TokenRejected(Reason.MISSING_TOKEN)
    return token


class AccessGuard:
    """The gateway's guard: look the method up, verify the token, check the roles, audit any
    refusal. Sets the principal (`current_principal()`) for the handler."""

    def __init__(
        self,
        verifier: TokenVerifier,
        audit: AuditTrail,
        table: Mapping[str, Access] = METHOD_ACCESS,
    ) -> None:
        self._verifier = verifier
        self._audit = audit
        self._table = table

    async def __call__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        access = lookup(self._table, method)
        if access is None:
            raise self._refuse(
                context,
                method,
                PermissionDenied(f"{method} is not exposed by the gateway"),
                action=ACCESS_DENIED,
                reason=NOT_EXPOSED,
                actor=ANONYMOUS,
            )
        if access.public:
            return
        try:
            principal = await self._verifier.verify(bearer_token(context))
        except TokenRejected as rejected:
            self._verifier.refusals[rejected.reason.value] += 1
            raise self._refuse(
                context,
                method,
                rejected,
                action=TOKEN_INVALID,
                reason=rejected.reason,
                actor=ANONYMOUS,
            ) from None
        if not principal.roles & access.roles:
            # Administration names its admin roles; other methods the roles beside admin's.
            others = access.roles - {ADMIN_ROLE, TENANT_ADMIN_ROLE}
            needed = " or ".join(sorted(access.roles - {ADMIN_ROLE} if others else access.roles))
            raise self._refuse(
                context,
                method,
                PermissionDenied(f"{method} needs the role {needed}"),
                action=ACCESS_DENIED,
                reason=ROLE_MISSING,
                actor=principal.actor,
                tenant=principal.tenant,
            )
        _principal.set(principal)

    def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        error: StreamMeshError,
        *,
        action: str,
        reason: str,
        actor: str,
        tenant: str = "",
    ) -> StreamMeshError:
        self._audit.record(
            refusal(
                action=action,
                reason=reason,
                actor=actor,
                source=client_address(context.peer()),
                details={"method": method.lstrip("/")},
                tenant=tenant,
            )
        )
        return error
