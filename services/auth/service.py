"""The AuthService handlers: check the request's shape, find the caller's origin, call the flows,
build replies. The administration handlers are in `admin_service`.

Errors are raised as `streammesh.mesh.errors` exceptions; the mesh interceptor turns them into
statuses. Nothing here logs request fields: they carry passwords, codes, tokens and secrets.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import grpc

from services.auth import convert
from services.auth.accounts import Accounts
from services.auth.admin import Administration
from services.auth.admin_service import AdminHandlers
from services.auth.audit import AuditLog, edge_event_problems
from services.auth.revocations import RevocationFeed
from services.auth.sessions import Sessions
from services.auth.tokens import KeyRing
from services.auth.validation import new_account
from streammesh.api.auth.v1 import auth_pb2, auth_pb2_grpc
from streammesh.mesh.errors import InvalidArgument

__all__ = ["AuthServicer"]

# Edge events may wait in the gateway's queue for a while, but never come from the future.
_MAX_EVENT_AGE = dt.timedelta(hours=1)
_MAX_CLOCK_SKEW = dt.timedelta(minutes=5)


class AuthServicer(AdminHandlers, auth_pb2_grpc.AuthServiceServicer):
    """Registration, TOTP enrolment, login, sessions, the JWKS, the audit log and admin calls."""

    def __init__(
        self,
        *,
        accounts: Accounts,
        sessions: Sessions,
        keys: KeyRing,
        admin: Administration,
        audit: AuditLog,
        revocations: RevocationFeed,
        trust_domain: str,
    ) -> None:
        super().__init__(admin=admin, trust_domain=trust_domain)
        self._revocations = revocations
        self._accounts = accounts
        self._sessions = sessions
        self._keys = keys
        self._audit = audit

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RegisterResponse:
        username, password, _ = new_account(request.username, request.password)
        user_id = await self._accounts.register(username, password, self._origin(context))
        return auth_pb2.RegisterResponse(user_id=str(user_id))

    async def BeginTotpEnrollment(
        self, request: auth_pb2.BeginTotpEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.BeginTotpEnrollmentResponse:
        enrollment = await self._accounts.begin_totp_enrollment(
            request.username, request.password, self._origin(context), tenant=request.tenant
        )
        return auth_pb2.BeginTotpEnrollmentResponse(
            secret=enrollment.secret, otpauth_uri=enrollment.otpauth_uri
        )

    async def ConfirmTotpEnrollment(
        self, request: auth_pb2.ConfirmTotpEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ConfirmTotpEnrollmentResponse:
        codes = await self._accounts.confirm_totp_enrollment(
            request.username,
            request.password,
            request.code,
            self._origin(context),
            tenant=request.tenant,
        )
        return auth_pb2.ConfirmTotpEnrollmentResponse(recovery_codes=codes)

    async def StartLogin(
        self, request: auth_pb2.StartLoginRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.StartLoginResponse:
        issued = await self._accounts.start_login(
            request.username, request.password, self._origin(context), tenant=request.tenant
        )
        return auth_pb2.StartLoginResponse(
            challenge=issued.challenge, expires_in=convert.duration(issued.expires_in)
        )

    async def CompleteLogin(
        self, request: auth_pb2.CompleteLoginRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CompleteLoginResponse:
        factor = request.WhichOneof("factor")
        if factor is None:
            raise InvalidArgument(
                "no second factor",
                field_violations=[("factor", "set totp_code or recovery_code")],
            )
        tokens = await self._accounts.complete_login(
            request.challenge,
            self._origin(context),
            totp_code=request.totp_code if factor == "totp_code" else None,
            recovery_code=request.recovery_code if factor == "recovery_code" else None,
        )
        return auth_pb2.CompleteLoginResponse(tokens=convert.session_tokens_message(tokens))

    async def RefreshSession(
        self, request: auth_pb2.RefreshSessionRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RefreshSessionResponse:
        tokens = await self._sessions.refresh(request.refresh_token, self._origin(context))
        return auth_pb2.RefreshSessionResponse(tokens=convert.session_tokens_message(tokens))

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.LogoutResponse:
        await self._sessions.logout(request.refresh_token, self._origin(context))
        return auth_pb2.LogoutResponse()

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        # Read per call rather than cached: a key another replica rotated in or retired shows
        # at once, and the gateway caches the JWKS anyway.
        keys = await self._keys.published_jwks()
        return auth_pb2.GetJwksResponse(keys=[convert.jwk_message(jwk) for jwk in keys])

    async def WatchRevocations(
        self, request: auth_pb2.WatchRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[auth_pb2.WatchRevocationsResponse]:
        # A cursor that is not ours is not an error: the stream starts with a snapshot.
        async for response in self._revocations.watch(request.cursor):
            yield response

    async def RecordAuditEvent(
        self, request: auth_pb2.RecordAuditEventRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RecordAuditEventResponse:
        origin = self._origin(context)
        if not request.HasField("event"):
            raise InvalidArgument("no event", field_violations=[("event", "required")])
        message = auth_pb2.AuditEvent()
        message.CopyFrom(request.event)
        # Unset actor, source and tenant are the caller's own, as the metadata says.
        message.actor = message.actor or origin.actor
        message.source = message.source or origin.source
        message.tenant = message.tenant or origin.tenant or ""
        violations: list[tuple[str, str]] = []
        event_id = uuid.uuid4()
        if message.event_id:
            try:
                event_id = uuid.UUID(message.event_id)
            except ValueError:
                violations.append(("event.event_id", "empty or a UUID"))
        time = None
        if message.HasField("time"):
            try:
                time = message.time.ToDatetime(tzinfo=dt.UTC)
            except (ValueError, OverflowError):
                time = dt.datetime.min.replace(tzinfo=dt.UTC)
            now = dt.datetime.now(dt.UTC)
            if not now - _MAX_EVENT_AGE <= time <= now + _MAX_CLOCK_SKEW:
                violations.append(
                    ("event.time", "unset, or at most 1 hour old and 5 minutes ahead")
                )
        event = convert.audit_event_from_proto(message, event_id=event_id, time=time)
        violations += edge_event_problems(event)
        if violations:
            raise InvalidArgument("invalid audit event", field_violations=violations)
        await self._audit.record(event)
        return auth_pb2.RecordAuditEventResponse()
