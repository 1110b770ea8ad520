"""The administration handlers of AuthService (mixed into `service.AuthServicer`).

The gateway's AdminService lets only admins through; the caller named in the gateway's metadata
(or the operator certificate) is the actor of the audit row each call leaves.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from services.auth import convert
from services.auth.admin import Administration
from services.auth.audit import AuditQuery
from services.auth.origin import Origin, origin_of
from services.auth.paging import decode_token, encode_token, page_size
from services.auth.validation import (
    display_name_argument,
    new_account,
    role_set,
    tenant_argument,
    username_argument,
)
from streammesh.api.auth.v1 import auth_pb2
from streammesh.envelope import timestamp_problem
from streammesh.mesh.errors import InvalidArgument

__all__ = ["AdminHandlers"]

_PREFIX = re.compile(r"[a-z0-9._-]{0,64}")
_FILTER = re.compile(r"[\x20-\x7e]{0,128}")
_KID = re.compile(r"[\x21-\x7e]{1,128}")
"""What a kid can be; anything else (a NUL, which PostgreSQL text cannot hold) names no key."""


def _invalid_token() -> InvalidArgument:
    return InvalidArgument(
        "invalid page token", field_violations=[("page_token", "not from this query")]
    )


class AdminHandlers:
    """ListUsers ... ListAuditEvents and the tenant calls; see the proto for each call's
    contract."""

    def __init__(self, *, admin: Administration, trust_domain: str) -> None:
        self._admin = admin
        self._trust_domain = trust_domain

    def _origin(self, context: grpc.aio.ServicerContext) -> Origin:
        return origin_of(context, trust_domain=self._trust_domain)

    async def ListUsers(
        self, request: auth_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListUsersResponse:
        size = page_size(request.page_size)
        prefix = request.username_prefix.lower()
        if not _PREFIX.fullmatch(prefix):
            raise InvalidArgument(
                "invalid prefix",
                field_violations=[("username_prefix", "at most 64 username characters")],
            )
        tenant = tenant_argument(request.tenant)
        scope = {"prefix": prefix, "tenant": tenant}
        position = decode_token(request.page_token, scope) or {}
        after = position.get("after", "")
        if not isinstance(after, str):
            raise _invalid_token()
        views = await self._admin.list_users(
            prefix=prefix, after=after, limit=size + 1, origin=self._origin(context), tenant=tenant
        )
        now = dt.datetime.now(dt.UTC)
        reply = auth_pb2.ListUsersResponse(
            users=[convert.user_message(view, now=now) for view in views[:size]]
        )
        if len(views) > size:
            reply.next_page_token = encode_token({"after": views[size - 1].user.username}, scope)
        return reply

    async def CreateUser(
        self, request: auth_pb2.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CreateUserResponse:
        username, password, roles = new_account(
            request.username, request.password, roles=request.roles
        )
        tenant = tenant_argument(request.tenant)
        view = await self._admin.create_user(
            username, password, roles, self._origin(context), tenant
        )
        return auth_pb2.CreateUserResponse(user=convert.user_message(view))

    async def SetUserDisabled(
        self, request: auth_pb2.SetUserDisabledRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.SetUserDisabledResponse:
        username = username_argument(request.username)
        view = await self._admin.set_disabled(
            username, request.disabled, self._origin(context), tenant_argument(request.tenant)
        )
        return auth_pb2.SetUserDisabledResponse(user=convert.user_message(view))

    async def SetUserRoles(
        self, request: auth_pb2.SetUserRolesRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.SetUserRolesResponse:
        username = username_argument(request.username)
        roles = role_set(request.roles)
        view = await self._admin.set_roles(
            username, roles, self._origin(context), tenant_argument(request.tenant)
        )
        return auth_pb2.SetUserRolesResponse(user=convert.user_message(view))

    async def ResetMfa(
        self, request: auth_pb2.ResetMfaRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ResetMfaResponse:
        username = username_argument(request.username)
        view = await self._admin.reset_mfa(
            username, self._origin(context), tenant_argument(request.tenant)
        )
        return auth_pb2.ResetMfaResponse(user=convert.user_message(view))

    async def UnlockUser(
        self, request: auth_pb2.UnlockUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UnlockUserResponse:
        username = username_argument(request.username)
        view = await self._admin.unlock(
            username, self._origin(context), tenant_argument(request.tenant)
        )
        return auth_pb2.UnlockUserResponse(user=convert.user_message(view))

    async def RevokeSessions(
        self, request: auth_pb2.RevokeSessionsRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RevokeSessionsResponse:
        username = username_argument(request.username)
        revoked = await self._admin.revoke_sessions(
            username, self._origin(context), tenant_argument(request.tenant)
        )
        return auth_pb2.RevokeSessionsResponse(revoked=revoked)

    async def ListSigningKeys(
        self, request: auth_pb2.ListSigningKeysRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListSigningKeysResponse:
        keys = await self._admin.list_keys(self._origin(context))
        return auth_pb2.ListSigningKeysResponse(keys=[convert.signing_key_message(k) for k in keys])

    async def RotateSigningKey(
        self, request: auth_pb2.RotateSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RotateSigningKeyResponse:
        result = await self._admin.rotate_key(self._origin(context))
        assert result.active is not None
        return auth_pb2.RotateSigningKeyResponse(
            active=convert.signing_key_message(result.active),
            retired=[convert.signing_key_message(key) for key in result.retired],
        )

    async def RetireSigningKey(
        self, request: auth_pb2.RetireSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RetireSigningKeyResponse:
        if not _KID.fullmatch(request.kid):
            raise InvalidArgument(
                "invalid kid", field_violations=[("kid", "1 to 128 printable ASCII characters")]
            )
        key = await self._admin.retire_key(request.kid, self._origin(context))
        return auth_pb2.RetireSigningKeyResponse(key=convert.signing_key_message(key))

    async def ListAuditEvents(
        self, request: auth_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListAuditEventsResponse:
        size = page_size(request.page_size)
        query = _audit_query(request)
        scope: dict[str, Any] = {
            "tenant": query.tenant,
            "actor": query.actor,
            "subject": query.subject,
            "action": query.action,
            "outcome": query.outcome,
            "start": query.start.isoformat() if query.start else "",
            "end": query.end.isoformat() if query.end else "",
        }
        position = decode_token(request.page_token, scope)
        before = None
        if position is not None:
            try:
                before = (dt.datetime.fromisoformat(position["t"]), int(position["i"]))
            except (KeyError, TypeError, ValueError):
                raise _invalid_token() from None
            if before[0].tzinfo is None:
                raise _invalid_token()
        rows = await self._admin.list_audit_events(
            query, limit=size + 1, before=before, origin=self._origin(context)
        )
        reply = auth_pb2.ListAuditEventsResponse(
            events=[convert.audit_event_message(event) for event, _ in rows[:size]]
        )
        if len(rows) > size:
            last, row_id = rows[size - 1]
            assert last.time is not None
            reply.next_page_token = encode_token({"t": last.time.isoformat(), "i": row_id}, scope)
        return reply

    async def CreateTenant(
        self, request: auth_pb2.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CreateTenantResponse:
        tenant_id = tenant_argument(request.tenant_id, "tenant_id", required=True)
        name = display_name_argument(request.display_name, tenant_id)
        tenant = await self._admin.create_tenant(tenant_id, name, self._origin(context))
        return auth_pb2.CreateTenantResponse(tenant=convert.tenant_message(tenant))

    async def ListTenants(
        self, request: auth_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListTenantsResponse:
        size = page_size(request.page_size)
        position = decode_token(request.page_token, {"list": "tenants"}) or {}
        after = position.get("after", "")
        if not isinstance(after, str):
            raise _invalid_token()
        tenants = await self._admin.list_tenants(
            after=after, limit=size + 1, origin=self._origin(context)
        )
        reply = auth_pb2.ListTenantsResponse(
            tenants=[convert.tenant_message(tenant) for tenant in tenants[:size]]
        )
        if len(tenants) > size:
            reply.next_page_token = encode_token(
                {"after": tenants[size - 1].id}, {"list": "tenants"}
            )
        return reply

    async def GetTenant(
        self, request: auth_pb2.GetTenantRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetTenantResponse:
        tenant_id = tenant_argument(request.tenant_id, "tenant_id", required=True)
        tenant = await self._admin.get_tenant(tenant_id, self._origin(context))
        return auth_pb2.GetTenantResponse(tenant=convert.tenant_message(tenant))

    async def SetTenantDisabled(
        self, request: auth_pb2.SetTenantDisabledRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.SetTenantDisabledResponse:
        tenant_id = tenant_argument(request.tenant_id, "tenant_id", required=True)
        tenant = await self._admin.set_tenant_disabled(
            tenant_id, request.disabled, self._origin(context)
        )
        return auth_pb2.SetTenantDisabledResponse(tenant=convert.tenant_message(tenant))


def _audit_query(request: auth_pb2.ListAuditEventsRequest) -> AuditQuery:
    violations = [
        (name, "at most 128 printable ASCII characters")
        for name in ("actor", "subject", "action", "outcome")
        if not _FILTER.fullmatch(getattr(request, name))
    ]
    start = _time(
        request.start_time if request.HasField("start_time") else None, "start_time", violations
    )
    end = _time(request.end_time if request.HasField("end_time") else None, "end_time", violations)
    if start is not None and end is not None and end < start:
        violations.append(("end_time", "must not be before start_time"))
    if violations:
        raise InvalidArgument("invalid audit query", field_violations=violations)
    tenant = tenant_argument(request.tenant)
    return AuditQuery(
        tenant=tenant,
        actor=request.actor,
        subject=request.subject,
        action=request.action,
        outcome=request.outcome,
        start=start,
        end=end,
    )


def _time(
    value: timestamp_pb2.Timestamp | None, field: str, violations: list[tuple[str, str]]
) -> dt.datetime | None:
    """`value` as a datetime; None when unset, or when invalid (then `field` is named)."""
    if value is None:
        return None
    problem = timestamp_problem(value)
    if problem is not None:
        violations.append((field, problem))
        return None
    return value.ToDatetime(tzinfo=dt.UTC)
