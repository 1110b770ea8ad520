"""The account flows: registration, TOTP enrolment, and the two-step login.

Every flow that checks credentials fails with one and the same UNAUTHENTICATED message whether the
user is unknown, the password is wrong, the account is locked or disabled, or the code is wrong;
an unknown user or a locked account costs the same argon2 verification as a wrong password, so
neither the answer nor its timing tells which. Only after a correct password may an answer be
more specific ("TOTP enrolment required"). The audit row, which only administrators read, gives
the real reason.

Login: StartLogin checks the password and hands out a challenge (see `challenges`); CompleteLogin
takes the challenge and a TOTP or recovery code and opens a session. No token exists before both
factors passed. Every failed attempt at either step counts toward the throttle and the lockout,
and the throttle's delays hold at both steps. Every registration counts against its source.

Tenants: usernames are unique per tenant, so the flows that name a user take its tenant too
(empty means "default"). An unknown tenant is answered like an unknown user, and a disabled one
like a disabled user: the generic UNAUTHENTICATED, so the answer does not tell whether a tenant
exists. Registration always creates the account in "default": a tenant's accounts are made by
its administrators, so no stranger can plant accounts in a tenant, and no anonymous call tells
whether one exists.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from services.auth import recovery, totp
from services.auth.audit import AuditLog, Outcome
from services.auth.challenges import Challenges
from services.auth.crypto import Purpose, SecretBox
from services.auth.origin import Origin
from services.auth.passwords import MAX_PASSWORD_CHARS, Passwords, normalize_password
from services.auth.sessions import Sessions, SessionTokens
from services.auth.store import AuthStore, UserRecord, account_name
from services.auth.throttle import Throttle, Verdict
from streammesh.mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unauthenticated,
)
from streammesh.mesh.tenancy import DEFAULT_TENANT, canonical_tenant

__all__ = [
    "INVALID_CREDENTIALS",
    "TOTP_REQUIRED",
    "USERNAME_RULE",
    "Accounts",
    "Enrollment",
    "IssuedChallenge",
    "canonical_username",
]

log = logging.getLogger(__name__)

INVALID_CREDENTIALS = "invalid username, password or code"
TOTP_REQUIRED = "TOTP enrolment required"
TOO_MANY_ATTEMPTS = "too many failed attempts; retry later"
USERNAME_RULE = "3 to 64 characters: letters, digits, '.', '_' or '-'"
_USERNAME = re.compile(r"[A-Za-z0-9._-]{3,64}")


def canonical_username(username: str) -> str | None:
    """The stored (lower-case) form of a well-formed username, or None if it breaks the rule."""
    if not _USERNAME.fullmatch(username):
        return None
    return username.lower()


@dataclass(frozen=True)
class Enrollment:
    """A new, not yet active TOTP secret and the URI an authenticator app imports."""

    secret: str
    otpauth_uri: str


@dataclass(frozen=True)
class IssuedChallenge:
    """What StartLogin hands out."""

    challenge: str
    expires_in: float


class _Attempt:
    """One admitted attempt on an account; settled exactly once (failed, released, succeeded)."""

    def __init__(self, throttle: Throttle, account: str, source: str) -> None:
        self._throttle = throttle
        self.account = account
        self._source = source
        self._settled = False

    async def fail(self) -> bool:
        """Count the failure; True when it locked the account."""
        self._settled = True
        return (await self._throttle.failed(self.account, self._source)).locked_now

    async def succeed(self) -> None:
        self._settled = True
        await self._throttle.succeeded(self.account, self._source)

    async def release(self) -> None:
        """Not a failure (or not decided): take the attempt back; no-op once settled."""
        if not self._settled:
            self._settled = True
            await self._throttle.release(self.account, self._source)


class Accounts:
    """Account flows over the store, with hashing, TOTP, throttling, sessions and auditing."""

    def __init__(
        self,
        *,
        store: AuthStore,
        passwords: Passwords,
        box: SecretBox,
        throttle: Throttle,
        challenges: Challenges,
        sessions: Sessions,
        audit: AuditLog,
        default_roles: Sequence[str],
        totp_issuer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._passwords = passwords
        self._box = box
        self._throttle = throttle
        self._challenges = challenges
        self._sessions = sessions
        self._audit = audit
        self._default_roles = tuple(default_roles)
        self._totp_issuer = totp_issuer
        # The clock TOTP time steps are taken from (tests move it to check drift).
        self._clock = clock
        self.events: Counter[tuple[str, str, str]] = Counter()
        """Audited events by (action, outcome, reason), for the metrics (no subject kept)."""

    async def create(
        self,
        username: str,
        password: str,
        roles: Sequence[str] | None,
        tenant: str = DEFAULT_TENANT,
    ) -> UserRecord:
        """Create a user in the existing `tenant`; `username` canonical, `password` normalized
        and within the policy (the service validates both first); None roles means the default
        ones."""
        password_hash = await self._passwords.hash(password)
        user_id = uuid.uuid4()
        created = await self._store.create_user(
            user_id=user_id,
            username=username,
            password_hash=password_hash,
            roles=self._default_roles if roles is None else tuple(roles),
            tenant=tenant,
        )
        user = await self._store.get_user(username, tenant=tenant) if created else None
        if user is None:
            raise AlreadyExists("that username is taken in this tenant")
        log.info("created user %s", user_id)
        return user

    async def register(self, username: str, password: str, origin: Origin) -> uuid.UUID:
        """Self-service registration with the default roles.

        Every registration spends the source's allowance of failures, whatever its outcome: the
        answer tells whether a username is taken (it must: the name is the registrant's own
        choice, and there is no other channel to tell them), so without a cost it would list
        the users; and each one costs an argon2 hash.
        """
        origin = origin.within(DEFAULT_TENANT)
        admission = await self._throttle.spend_source(origin.source)
        if admission.verdict is Verdict.WAIT:
            await self._record(origin, "register", Outcome.FAILURE, username, "throttled")
            raise ResourceExhausted(TOO_MANY_ATTEMPTS, retry_after_seconds=admission.retry_after)
        try:
            user = await self.create(username, password, None)
        except AlreadyExists:
            await self._record(origin, "register", Outcome.FAILURE, username, "username_taken")
            raise
        await self._record(origin, "register", Outcome.SUCCESS, username)
        return user.id

    async def begin_totp_enrollment(
        self, username: str, password: str, origin: Origin, *, tenant: str = ""
    ) -> Enrollment:
        """Store a fresh pending secret (sealed) and return it in the clear, once."""
        action = "totp_enroll_begin"
        origin = await self._in_tenant(origin, tenant, action)
        user, _, attempt = await self._check_password(username, password, origin, action)
        try:
            if user.totp_enabled:
                # Re-enrolling with a password alone would let whoever knows the password
                # replace the second factor; a reset is for an administrator (ResetMfa).
                await self._record(
                    origin, action, Outcome.FAILURE, user.username, "already_enabled"
                )
                raise FailedPrecondition("TOTP is already enabled for this user")
            secret = totp.new_secret()
            sealed = self._box.seal(
                secret.encode(), purpose=Purpose.TOTP_PENDING, row_id=str(user.id)
            )
            if not await self._store.set_pending_totp(user.id, sealed):
                raise FailedPrecondition("TOTP is already enabled for this user")
            await self._record(origin, action, Outcome.SUCCESS, user.username)
        finally:
            await attempt.release()
        return Enrollment(
            secret=secret,
            otpauth_uri=totp.otpauth_uri(secret, account=user.username, issuer=self._totp_issuer),
        )

    async def confirm_totp_enrollment(
        self, username: str, password: str, code: str, origin: Origin, *, tenant: str = ""
    ) -> list[str]:
        """Activate the pending secret once a code from it proves the app has it; returns the
        new recovery codes (their hashes replace any earlier ones)."""
        action = "totp_enroll_confirm"
        origin = await self._in_tenant(origin, tenant, action)
        user, _, attempt = await self._check_password(username, password, origin, action)
        try:
            if user.totp_enabled:
                await self._record(
                    origin, action, Outcome.FAILURE, user.username, "already_enabled"
                )
                raise FailedPrecondition("TOTP is already enabled for this user")
            pending = user.totp_pending_secret
            if pending is None:
                await self._record(origin, action, Outcome.FAILURE, user.username, "not_begun")
                raise FailedPrecondition("no TOTP enrolment is pending; begin one first")
            secret = self._box.open(pending, purpose=Purpose.TOTP_PENDING, row_id=str(user.id))
            step = totp.matching_step(secret.decode(), code, now=self._clock())
            if step is None:
                await self._fail(attempt, origin, action, user.username, "bad_code")
            codes = recovery.new_codes()
            hashes = [
                recovery.code_digest(self._box, user.id, canonical)
                for canonical in map(recovery.canonical_code, codes)
                if canonical is not None
            ]
            sealed = self._box.seal(secret, purpose=Purpose.TOTP_ACTIVE, row_id=str(user.id))
            # The confirming code's step counts as used: no code is ever accepted twice, so the
            # first login needs the authenticator's next code.
            if not await self._store.activate_totp(
                user.id, pending=pending, sealed_secret=sealed, step=step, recovery_hashes=hashes
            ):
                raise FailedPrecondition("the TOTP enrolment changed meanwhile; begin again")
            await self._record(origin, action, Outcome.SUCCESS, user.username)
        finally:
            await attempt.release()
        log.info("TOTP enabled for user %s", user.id)
        return codes

    async def start_login(
        self, username: str, password: str, origin: Origin, *, tenant: str = ""
    ) -> IssuedChallenge:
        """First step: the password. Returns a challenge for the second factor."""
        action = "login_password"
        origin = await self._in_tenant(origin, tenant, action)
        user, normalized, attempt = await self._check_password(username, password, origin, action)
        try:
            if not user.totp_enabled:
                await self._record(
                    origin, action, Outcome.FAILURE, user.username, "mfa_not_enrolled"
                )
                raise FailedPrecondition(TOTP_REQUIRED)
            await self._rehash_if_needed(user, normalized)
            challenge = await self._challenges.issue(user.id, user.username, user.tenant)
            await self._record(origin, action, Outcome.SUCCESS, user.username)
        finally:
            await attempt.release()
        return IssuedChallenge(challenge=challenge, expires_in=self._challenges.ttl_seconds)

    async def complete_login(
        self,
        challenge: str,
        origin: Origin,
        *,
        totp_code: str | None = None,
        recovery_code: str | None = None,
    ) -> SessionTokens:
        """Second step: the challenge (taken, so never usable again) and one factor.

        The throttle's delays apply here as at the password step, so guesses spread over many
        challenges wait like any others. The challenge is looked at before and taken only after
        admission: a caller told to wait keeps it and retries with it after the delay.
        """
        action = "login"
        issued = await self._challenges.peek(challenge)
        if issued is None:
            await self._record(origin, action, Outcome.FAILURE, "", "bad_challenge")
            raise Unauthenticated(INVALID_CREDENTIALS)
        origin = origin.within(issued.tenant)
        attempt = await self._admit(issued.username, origin, action)
        try:
            taken = await self._challenges.take(challenge)
            if taken is None:  # taken by a concurrent call (or expired) since the look
                await self._record(
                    origin, action, Outcome.FAILURE, issued.username, "bad_challenge"
                )
                raise Unauthenticated(INVALID_CREDENTIALS)
            user = await self._store.get_user_by_id(taken.user_id)
            reason = _refusal(user)
            if user is None or reason is not None:
                await self._record(origin, action, Outcome.FAILURE, taken.username, reason)
                raise Unauthenticated(INVALID_CREDENTIALS)
            details = {"factor": "totp" if totp_code is not None else "recovery_code"}
            if totp_code is not None:
                await self._check_totp(user, totp_code, attempt, origin)
            else:
                await self._check_recovery_code(user, recovery_code or "", attempt, origin)
                left = await self._store.unused_recovery_codes(user.id)
                details["recovery_codes_left"] = str(left)
            await attempt.succeed()
            tokens = await self._sessions.open(user)
            details["session_id"] = str(tokens.session_id)
            await self._record(origin, action, Outcome.SUCCESS, user.username, details=details)
        finally:
            await attempt.release()
        return tokens

    async def _check_totp(
        self, user: UserRecord, code: str, attempt: _Attempt, origin: Origin
    ) -> None:
        assert user.totp_secret is not None
        secret = self._box.open(user.totp_secret, purpose=Purpose.TOTP_ACTIVE, row_id=str(user.id))
        step = totp.matching_step(secret.decode(), code, now=self._clock())
        if step is None:
            await self._fail(attempt, origin, "login", user.username, "bad_code")
        # Atomic: of two logins with the same code, at most one gets the step.
        elif not await self._store.consume_totp_step(user.id, step):
            await self._fail(attempt, origin, "login", user.username, "code_reused")

    async def _check_recovery_code(
        self, user: UserRecord, code: str, attempt: _Attempt, origin: Origin
    ) -> None:
        canonical = recovery.canonical_code(code)
        if canonical is None or not await self._store.consume_recovery_code(
            user.id, recovery.code_digest(self._box, user.id, canonical)
        ):
            await self._fail(attempt, origin, "login", user.username, "bad_recovery_code")

    async def _check_password(
        self, username: str, password: str, origin: Origin, action: str
    ) -> tuple[UserRecord, str, _Attempt]:
        """The enabled user whose password this is, the normalized password, and the admitted
        attempt (the caller settles it); otherwise the one generic UNAUTHENTICATED."""
        canonical = canonical_username(username)
        normalized = normalize_password(password)
        # Malformed input can match no account; answering at once tells the caller nothing new.
        if canonical is None or not normalized or len(normalized) > MAX_PASSWORD_CHARS:
            await self._record(origin, action, Outcome.FAILURE, "", "malformed")
            raise Unauthenticated(INVALID_CREDENTIALS)
        attempt = await self._admit(canonical, origin, action, password=normalized)
        try:
            user = await self._store.get_user(canonical, tenant=origin.tenant or DEFAULT_TENANT)
            if user is None:
                await self._passwords.verify_dummy(normalized)
                await self._fail(attempt, origin, action, canonical, "unknown_user")
            if not await self._passwords.verify(user.password_hash, normalized):
                await self._fail(attempt, origin, action, canonical, "bad_credentials")
            reason = _disabled(user)
            if reason is not None:
                await self._record(origin, action, Outcome.FAILURE, canonical, reason)
                raise Unauthenticated(INVALID_CREDENTIALS)
        except BaseException:
            await attempt.release()
            raise
        return user, normalized, attempt

    async def _in_tenant(self, origin: Origin, tenant: str, action: str) -> Origin:
        """`origin` within the tenant a flow names (empty: "default"); a malformed one can
        match no account and gets the generic answer at once."""
        canonical = canonical_tenant(tenant) if tenant else DEFAULT_TENANT
        if canonical is None:
            await self._record(origin, action, Outcome.FAILURE, "", "malformed")
            raise Unauthenticated(INVALID_CREDENTIALS)
        return origin.within(canonical)

    async def _admit(
        self,
        username: str,
        origin: Origin,
        action: str,
        *,
        password: str | None = None,
    ) -> _Attempt:
        """Admit an attempt on `username` of the origin's tenant (or refuse it)."""
        account = account_name(origin.tenant or DEFAULT_TENANT, username)
        admission = await self._throttle.admit(account, origin.source)
        if admission.verdict is Verdict.LOCKED:
            if password is not None:
                # As slow as a wrong password: timing must not tell a locked account apart.
                await self._passwords.verify_dummy(password)
            await self._record(origin, action, Outcome.FAILURE, username, "locked")
            raise Unauthenticated(INVALID_CREDENTIALS)
        if admission.verdict is Verdict.WAIT:
            await self._record(origin, action, Outcome.FAILURE, username, "throttled")
            raise ResourceExhausted(TOO_MANY_ATTEMPTS, retry_after_seconds=admission.retry_after)
        return _Attempt(self._throttle, account, origin.source)

    async def _fail(
        self, attempt: _Attempt, origin: Origin, action: str, subject: str, reason: str
    ) -> NoReturn:
        """Count and audit a failed attempt, then refuse with the generic answer."""
        locked_now = await attempt.fail()
        await self._record(origin, action, Outcome.FAILURE, subject, reason)
        if locked_now:
            log.warning("account %s locked after repeated failures", subject)
            await self._record(origin, "lockout", Outcome.DENIED, subject, "too_many_failures")
        raise Unauthenticated(INVALID_CREDENTIALS)

    async def _record(
        self,
        origin: Origin,
        action: str,
        outcome: str,
        subject: str,
        reason: str | None = None,
        *,
        details: dict[str, str] | None = None,
    ) -> None:
        self.events[(action, outcome, reason or "")] += 1
        await self._audit.record(
            origin.event(action, outcome, subject=subject, reason=reason or "", details=details)
        )

    async def _rehash_if_needed(self, user: UserRecord, password: str) -> None:
        """`password` is the normalized password that just verified."""
        if not self._passwords.needs_rehash(user.password_hash):
            return
        new_hash = await self._passwords.hash(password)
        # A concurrent password change wins; the next login re-hashes again if still needed.
        if await self._store.replace_password_hash(user.id, old=user.password_hash, new=new_hash):
            log.info("password of user %s re-hashed with current parameters", user.id)


def _disabled(user: UserRecord) -> str | None:
    """Why `user` may not sign in whatever the credentials: it, or its tenant, is disabled."""
    if user.disabled:
        return "user_disabled"
    if user.tenant_disabled:
        return "tenant_disabled"
    return None


def _refusal(user: UserRecord | None) -> str | None:
    """Why a challenge of `user` cannot complete any more (deleted, disabled, tenant disabled,
    MFA reset)."""
    if user is None:
        return "unknown_user"
    disabled = _disabled(user)
    if disabled is not None:
        return disabled
    if not user.totp_enabled:
        return "mfa_not_enrolled"
    return None
