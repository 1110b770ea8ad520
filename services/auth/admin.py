"""Administration: tenants, accounts, signing keys and the scheduled key maintenance.

The gateway lets only admins reach these calls; auth checks the caller's scope itself (see
`scope`), and records the admin (the actor) on an audit row for every call, reads included, so
the log shows who looked at or changed what. A row about an account belongs to the account's
tenant, so that tenant's admins see it; it names the actor's tenant in `actor_tenant` when that
is another one (a platform admin's).

A tenant admin acts only within its tenant: another tenant's users are not found there, another
tenant named in a request answers as a tenant that does not exist, it cannot grant `admin`, and
it cannot change a platform admin (who may be in its tenant only when that is "default").
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NoReturn

from services.auth.accounts import Accounts
from services.auth.audit import AuditEvent, AuditLog, AuditQuery, Outcome
from services.auth.keystore import RotationResult, SigningKeyRecord
from services.auth.origin import SYSTEM, Origin
from services.auth.roles import PLATFORM_ADMIN
from services.auth.scope import NO_SUCH_TENANT, Scope, scope_of
from services.auth.sessions import Sessions
from services.auth.store import AuthStore, UserRecord
from services.auth.tenants import TenantRecord, TenantStore
from services.auth.throttle import Throttle
from services.auth.tokens import KeyRing
from streammesh.mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from streammesh.mesh.tenancy import DEFAULT_TENANT

__all__ = ["Administration", "UserView"]

log = logging.getLogger(__name__)

_DAY = 86_400.0
_PLATFORM = ""
"""The audit tenant of platform events (signing keys): no tenant's log, whoever the actor."""


@dataclass(frozen=True)
class UserView:
    """A user as administrators see it: the row and how long it stays locked (seconds)."""

    user: UserRecord
    locked_for: float | None = None


class Administration:
    """The admin calls, each audited with the caller as actor."""

    def __init__(
        self,
        *,
        accounts: Accounts,
        store: AuthStore,
        sessions: Sessions,
        throttle: Throttle,
        keys: KeyRing,
        audit: AuditLog,
        tenants: TenantStore,
    ) -> None:
        self._tenants = tenants
        self._accounts = accounts
        self._store = store
        self._sessions = sessions
        self._throttle = throttle
        self._keys = keys
        self._audit = audit

    # Users: each call acts in one tenant (`tenant` canonical, empty = the caller's own) and
    # is audited in that tenant.

    async def list_users(
        self, *, prefix: str, after: str, limit: int, origin: Origin, tenant: str = ""
    ) -> list[UserView]:
        """Up to `limit` users of the tenant by username, after `after`, starting with
        `prefix`."""
        scope = await self._scope(origin)
        target = await self._target(scope, tenant, "list_users", origin)
        users = await self._store.list_users(after=after, prefix=prefix, limit=limit, tenant=target)
        await self._record(origin, "list_users", details={"count": str(len(users))}, tenant=target)
        return await self._views(users)

    async def create_user(
        self,
        username: str,
        password: str,
        roles: Sequence[str] | None,
        origin: Origin,
        tenant: str = "",
    ) -> UserView:
        """A new account (its owner enrols TOTP); `roles` None means the defaults."""
        scope = await self._scope(origin)
        target = await self._target(scope, tenant, "user_created", origin, username)
        self._check_grant(scope, target, roles or ())
        try:
            user = await self._accounts.create(username, password, roles, target)
        except AlreadyExists:
            await self._record(
                origin, "user_created", username, None, Outcome.FAILURE, "username_taken", target
            )
            raise
        details = {"roles": ",".join(user.roles)}
        await self._record(origin, "user_created", user.username, details, tenant=target)
        return UserView(user)

    async def set_disabled(
        self, username: str, disabled: bool, origin: Origin, tenant: str = ""
    ) -> UserView:
        """Disable (ending every session) or re-enable an account."""
        action = "user_disabled" if disabled else "user_enabled"
        user = await self._find(username, tenant, action, origin)
        updated = await self._store.set_disabled(user.id, disabled)
        if updated is None:
            await self._not_found(username, action, origin, user.tenant)
        details = {}
        if disabled:
            details["sessions_revoked"] = str(await self._sessions.revoke_user(user.id, action))
        await self._record(origin, action, username, details, tenant=user.tenant)
        return await self._view(updated)

    async def set_roles(
        self, username: str, roles: Sequence[str], origin: Origin, tenant: str = ""
    ) -> UserView:
        """Replace the roles. The user's access tokens are revoked (they carry the old ones);
        the session stays, and its next refresh carries the new roles."""
        scope = await self._scope(origin)
        user = await self._find(username, tenant, "role_change", origin, scope)
        self._check_grant(scope, user.tenant, roles)
        updated = await self._store.set_roles(user.id, sorted(set(roles)))
        if updated is None:
            await self._not_found(username, "role_change", origin, user.tenant)
        details = {"roles": ",".join(updated.roles), "previous": ",".join(user.roles)}
        await self._record(origin, "role_change", username, details, tenant=user.tenant)
        return await self._view(updated)

    async def reset_mfa(self, username: str, origin: Origin, tenant: str = "") -> UserView:
        """Remove TOTP and every recovery code (the user enrols again after the password) and
        revoke the user's access tokens."""
        user = await self._find(username, tenant, "mfa_reset", origin)
        updated = await self._store.reset_mfa(user.id)
        if updated is None:
            await self._not_found(username, "mfa_reset", origin, user.tenant)
        await self._record(origin, "mfa_reset", username, tenant=user.tenant)
        return await self._view(updated)

    async def unlock(self, username: str, origin: Origin, tenant: str = "") -> UserView:
        """Lift a lock and clear the account's failure counter and delay."""
        user = await self._find(username, tenant, "unlock", origin)
        await self._throttle.unlock(user.account)
        await self._record(origin, "unlock", username, tenant=user.tenant)
        return UserView(user)

    async def revoke_sessions(self, username: str, origin: Origin, tenant: str = "") -> int:
        """End every session of an account; returns how many were live."""
        user = await self._find(username, tenant, "sessions_revoked", origin)
        revoked = await self._sessions.revoke_user(user.id, "admin")
        details = {"count": str(revoked)}
        await self._record(origin, "sessions_revoked", username, details, tenant=user.tenant)
        return revoked

    # Tenants (platform admins only)

    async def create_tenant(
        self, tenant_id: str, display_name: str, origin: Origin
    ) -> TenantRecord:
        """A new enabled tenant without users."""
        await self._platform(origin)
        tenant = await self._tenants.create(tenant_id, display_name)
        if tenant is None:
            await self._record(
                origin, "tenant_created", "", None, Outcome.FAILURE, "tenant_taken", tenant_id
            )
            raise AlreadyExists("that tenant id is taken")
        await self._record(origin, "tenant_created", tenant=tenant_id)
        return tenant

    async def list_tenants(self, *, after: str, limit: int, origin: Origin) -> list[TenantRecord]:
        """Up to `limit` tenants by id, after `after`."""
        await self._platform(origin)
        tenants = await self._tenants.list(after=after, limit=limit)
        await self._record(origin, "list_tenants", details={"count": str(len(tenants))}, tenant="")
        return tenants

    async def get_tenant(self, tenant_id: str, origin: Origin) -> TenantRecord:
        """One tenant."""
        await self._platform(origin)
        tenant = await self._tenants.get(tenant_id)
        if tenant is None:
            await self._record(
                origin, "get_tenant", "", None, Outcome.FAILURE, "unknown_tenant", tenant=""
            )
            raise NotFound(NO_SUCH_TENANT)
        await self._record(origin, "get_tenant", tenant=tenant_id)
        return tenant

    async def set_tenant_disabled(
        self, tenant_id: str, disabled: bool, origin: Origin
    ) -> TenantRecord:
        """Disable (its access tokens end at every gateway; no login or refresh) or enable."""
        await self._platform(origin)
        action = "tenant_disabled" if disabled else "tenant_enabled"
        if tenant_id == DEFAULT_TENANT and disabled:
            await self._record(
                origin, action, "", None, Outcome.FAILURE, "default_tenant", DEFAULT_TENANT
            )
            raise FailedPrecondition(
                f"tenant {DEFAULT_TENANT} cannot be disabled: it holds the platform admins"
            )
        tenant = await self._tenants.set_disabled(tenant_id, disabled)
        if tenant is None:
            await self._record(origin, action, "", None, Outcome.FAILURE, "unknown_tenant", "")
            raise NotFound(NO_SUCH_TENANT)
        await self._record(origin, action, tenant=tenant_id)
        return tenant

    # Signing keys

    async def list_keys(self, origin: Origin) -> list[SigningKeyRecord]:
        """Every signing key, retired ones included, newest first."""
        await self._platform(origin)
        keys = await self._keys.all()
        await self._record(
            origin, "list_signing_keys", details={"count": str(len(keys))}, tenant=_PLATFORM
        )
        return keys

    async def rotate_key(self, origin: Origin) -> RotationResult:
        """A new active key now; replaced keys past their overlap window are retired."""
        await self._platform(origin)
        result = await self._keys.rotate()
        self._log_rotation(result)
        await self._record_rotation(result, origin)
        return result

    async def retire_key(self, kid: str, origin: Origin) -> SigningKeyRecord:
        """Stop publishing `kid` now: tokens it signed stop verifying."""
        await self._platform(origin)
        outcome = await self._keys.retire(kid)
        details = {"kid": kid[:64]}
        if outcome.key is None:
            await self._record(
                origin, "key_retired", "", details, Outcome.FAILURE, "unknown_key", _PLATFORM
            )
            raise NotFound("no signing key has that kid")
        if outcome.refused:
            await self._record(
                origin, "key_retired", "", details, Outcome.FAILURE, "active_key", _PLATFORM
            )
            raise FailedPrecondition("the active key cannot be retired; rotate first")
        await self._record(origin, "key_retired", "", details, tenant=_PLATFORM)
        return outcome.key

    async def maintain_keys(self, rotation_days: int) -> RotationResult:
        """The scheduled job: rotate when the active key is `rotation_days` old (0 = never) and
        retire keys past their overlap window. Safe to run on every replica at once: the check
        happens under the store's lock, so one rotation happens."""
        if rotation_days > 0:
            result = await self._keys.rotate(if_older_than_seconds=rotation_days * _DAY)
        else:
            result = RotationResult(active=None, retired=await self._keys.retire_expired())
        if result.active is not None or result.retired:
            self._log_rotation(result)
            await self._record_rotation(result, SYSTEM)
        return result

    # Audit log

    async def list_audit_events(
        self,
        query: AuditQuery,
        *,
        limit: int,
        before: tuple[dt.datetime, int] | None,
        origin: Origin,
    ) -> list[tuple[AuditEvent, int]]:
        """Matching events newest first, older than `before` (see AuditLog.query); a tenant
        admin's only ever of its own tenant."""
        scope = await self._scope(origin)
        if not scope.platform:
            target = await self._target(scope, query.tenant, "list_audit_events", origin)
            query = replace(query, tenant=target)
        events = await self._audit.query(query, limit=limit, before=before)
        details = {"count": str(len(events))}
        await self._record(origin, "list_audit_events", details=details, tenant=query.tenant)
        return events

    # Helpers

    def _log_rotation(self, result: RotationResult) -> None:
        if result.active is not None:
            log.info("signing key rotated: new active key %s", result.active.kid)
        for key in result.retired:
            log.info("signing key %s retired after its overlap window", key.kid)

    async def _record_rotation(self, result: RotationResult, origin: Origin) -> None:
        if result.active is not None:
            await self._record(
                origin, "key_rotation", "", {"kid": result.active.kid}, tenant=_PLATFORM
            )
        for key in result.retired:
            details = {"kid": key.kid, "by": "overlap_passed"}
            await self._record(origin, "key_retired", "", details, tenant=_PLATFORM)

    async def _scope(self, origin: Origin) -> Scope:
        return await scope_of(origin, self._store)

    async def _platform(self, origin: Origin) -> None:
        if not (await self._scope(origin)).platform:
            raise PermissionDenied("only a platform admin may do this")

    async def _target(
        self, scope: Scope, tenant: str, action: str, origin: Origin, subject: str = ""
    ) -> str:
        """The tenant the call acts on (see Scope.target); a refusal is audited in the
        caller's own tenant with the reason a missing tenant gets, so its log tells nothing."""
        try:
            return await scope.target(tenant, self._tenants)
        except NotFound:
            reason = "unknown_tenant"
            await self._record(origin, action, subject, None, Outcome.FAILURE, reason, scope.tenant)
            raise

    def _check_grant(self, scope: Scope, tenant: str, roles: Sequence[str]) -> None:
        if PLATFORM_ADMIN not in roles:
            return
        if not scope.platform:
            raise PermissionDenied(f"only a platform admin may grant the role {PLATFORM_ADMIN}")
        if tenant != DEFAULT_TENANT:
            raise InvalidArgument(
                "invalid roles",
                field_violations=[
                    (
                        "roles",
                        f"{PLATFORM_ADMIN} (platform admin) is only for tenant {DEFAULT_TENANT}; "
                        "a tenant's administrators have tenant-admin",
                    )
                ],
            )

    async def _find(
        self,
        username: str,
        tenant: str,
        action: str,
        origin: Origin,
        scope: Scope | None = None,
    ) -> UserRecord:
        """The user `username` of the tenant the call acts on. A tenant admin cannot act on a
        platform admin (of tenant "default", which may be its own)."""
        scope = scope or await self._scope(origin)
        target = await self._target(scope, tenant, action, origin, username)
        user = await self._store.get_user(username, tenant=target)
        if user is None:
            await self._not_found(username, action, origin, target)
        if PLATFORM_ADMIN in user.roles and not scope.platform:
            await self._record(
                origin, action, username, None, Outcome.DENIED, "platform_admin", target
            )
            raise PermissionDenied(f"{username} is a platform admin; only a platform admin may")
        return user

    async def _not_found(self, username: str, action: str, origin: Origin, tenant: str) -> NoReturn:
        await self._record(origin, action, username, None, Outcome.FAILURE, "unknown_user", tenant)
        raise NotFound("no such user")

    async def _view(self, user: UserRecord) -> UserView:
        return (await self._views([user]))[0]

    async def _views(self, users: list[UserRecord]) -> list[UserView]:
        locks = await self._throttle.lock_remaining([user.account for user in users])
        return [UserView(user, locked) for user, locked in zip(users, locks, strict=True)]

    async def _record(
        self,
        origin: Origin,
        action: str,
        subject: str = "",
        details: dict[str, str] | None = None,
        outcome: str = Outcome.SUCCESS,
        reason: str = "",
        tenant: str | None = None,
    ) -> None:
        """Audit a call in `tenant` (default: the actor's; "" for a platform event), naming
        the actor's tenant when the row belongs to another one."""
        details = dict(details or {})
        if tenant and origin.tenant is not None and tenant != origin.tenant:
            details["actor_tenant"] = origin.tenant
        await self._audit.record(
            origin.event(
                action, outcome, subject=subject, reason=reason, details=details, tenant=tenant
            )
        )
