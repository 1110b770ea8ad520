"""Administration: accounts, signing keys and the scheduled key maintenance.

The gateway lets only admins reach these calls; auth records the admin (the actor) on an audit
row for every call, reads included, so the log shows who looked at or changed what.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from services.auth.accounts import Accounts
from services.auth.audit import AuditEvent, AuditLog, AuditQuery, Outcome
from services.auth.keystore import RotationResult, SigningKeyRecord
from services.auth.origin import SYSTEM, Origin
from services.auth.sessions import Sessions
from services.auth.store import AuthStore, UserRecord
from services.auth.throttle import Throttle
from services.auth.tokens import KeyRing
from streammesh.mesh.errors import AlreadyExists, FailedPrecondition, NotFound

__all__ = ["Administration", "UserView"]

log = logging.getLogger(__name__)

_DAY = 86_400.0


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
    ) -> None:
        self._accounts = accounts
        self._store = store
        self._sessions = sessions
        self._throttle = throttle
        self._keys = keys
        self._audit = audit

    # Users

    async def list_users(
        self, *, prefix: str, after: str, limit: int, origin: Origin
    ) -> list[UserView]:
        """Up to `limit` users by username, after `after`, starting with `prefix`."""
        users = await self._store.list_users(after=after, prefix=prefix, limit=limit)
        await self._record(origin, "list_users", details={"count": str(len(users))})
        return await self._views(users)

    async def create_user(
        self, username: str, password: str, roles: Sequence[str] | None, origin: Origin
    ) -> UserView:
        """A new account (its owner enrols TOTP); `roles` None means the defaults."""
        try:
            user = await self._accounts.create(username, password, roles)
        except AlreadyExists:
            await self._record(
                origin, "user_created", username, None, Outcome.FAILURE, "username_taken"
            )
            raise
        await self._record(origin, "user_created", user.username, {"roles": ",".join(user.roles)})
        return UserView(user)

    async def set_disabled(self, username: str, disabled: bool, origin: Origin) -> UserView:
        """Disable (ending every session) or re-enable an account."""
        action = "user_disabled" if disabled else "user_enabled"
        user = await self._find(username, action, origin)
        updated = await self._store.set_disabled(user.id, disabled)
        if updated is None:
            await self._not_found(username, action, origin)
        details = {}
        if disabled:
            details["sessions_revoked"] = str(await self._sessions.revoke_user(user.id, action))
        await self._record(origin, action, username, details)
        return await self._view(updated)

    async def set_roles(self, username: str, roles: Sequence[str], origin: Origin) -> UserView:
        """Replace the roles. The user's access tokens are revoked (they carry the old roles);
        the session stays, and its next refresh carries the new roles."""
        user = await self._find(username, "role_change", origin)
        updated = await self._store.set_roles(user.id, sorted(set(roles)))
        if updated is None:
            await self._not_found(username, "role_change", origin)
        details = {"roles": ",".join(updated.roles), "previous": ",".join(user.roles)}
        await self._record(origin, "role_change", username, details)
        return await self._view(updated)

    async def reset_mfa(self, username: str, origin: Origin) -> UserView:
        """Remove TOTP and every recovery code (the user enrols again after the password) and
        revoke the user's access tokens."""
        user = await self._find(username, "mfa_reset", origin)
        updated = await self._store.reset_mfa(user.id)
        if updated is None:
            await self._not_found(username, "mfa_reset", origin)
        await self._record(origin, "mfa_reset", username)
        return await self._view(updated)

    async def unlock(self, username: str, origin: Origin) -> UserView:
        """Lift a lock and clear the account's failure counter and delay."""
        user = await self._find(username, "unlock", origin)
        await self._throttle.unlock(user.username)
        await self._record(origin, "unlock", username)
        return UserView(user)

    async def revoke_sessions(self, username: str, origin: Origin) -> int:
        """End every session of an account; returns how many were live."""
        user = await self._find(username, "sessions_revoked", origin)
        revoked = await self._sessions.revoke_user(user.id, "admin")
        await self._record(origin, "sessions_revoked", username, {"count": str(revoked)})
        return revoked

    # Signing keys

    async def list_keys(self, origin: Origin) -> list[SigningKeyRecord]:
        """Every signing key, retired ones included, newest first."""
        keys = await self._keys.all()
        await self._record(origin, "list_signing_keys", details={"count": str(len(keys))})
        return keys

    async def rotate_key(self, origin: Origin) -> RotationResult:
        """A new active key now; replaced keys past their overlap window are retired."""
        result = await self._keys.rotate()
        self._log_rotation(result)
        await self._record_rotation(result, origin)
        return result

    async def retire_key(self, kid: str, origin: Origin) -> SigningKeyRecord:
        """Stop publishing `kid` now: tokens it signed stop verifying."""
        outcome = await self._keys.retire(kid)
        details = {"kid": kid[:64]}
        if outcome.key is None:
            await self._record(origin, "key_retired", "", details, Outcome.FAILURE, "unknown_key")
            raise NotFound("no signing key has that kid")
        if outcome.refused:
            await self._record(origin, "key_retired", "", details, Outcome.FAILURE, "active_key")
            raise FailedPrecondition("the active key cannot be retired; rotate first")
        await self._record(origin, "key_retired", "", details)
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
        """Matching events newest first, older than `before` (see AuditLog.query)."""
        events = await self._audit.query(query, limit=limit, before=before)
        await self._record(origin, "list_audit_events", details={"count": str(len(events))})
        return events

    # Helpers

    def _log_rotation(self, result: RotationResult) -> None:
        if result.active is not None:
            log.info("signing key rotated: new active key %s", result.active.kid)
        for key in result.retired:
            log.info("signing key %s retired after its overlap window", key.kid)

    async def _record_rotation(self, result: RotationResult, origin: Origin) -> None:
        if result.active is not None:
            await self._record(origin, "key_rotation", "", {"kid": result.active.kid})
        for key in result.retired:
            await self._record(origin, "key_retired", "", {"kid": key.kid, "by": "overlap_passed"})

    async def _find(self, username: str, action: str, origin: Origin) -> UserRecord:
        user = await self._store.get_user(username)
        if user is None:
            await self._not_found(username, action, origin)
        return user

    async def _not_found(self, username: str, action: str, origin: Origin) -> NoReturn:
        await self._record(origin, action, username, None, Outcome.FAILURE, "unknown_user")
        raise NotFound("no such user")

    async def _view(self, user: UserRecord) -> UserView:
        return (await self._views([user]))[0]

    async def _views(self, users: list[UserRecord]) -> list[UserView]:
        locks = await self._throttle.lock_remaining([user.username for user in users])
        return [UserView(user, locked) for user, locked in zip(users, locks, strict=True)]

    async def _record(
        self,
        origin: Origin,
        action: str,
        subject: str = "",
        details: dict[str, str] | None = None,
        outcome: str = Outcome.SUCCESS,
        reason: str = "",
    ) -> None:
        await self._audit.record(
            origin.event(action, outcome, subject=subject, reason=reason, details=details)
        )
