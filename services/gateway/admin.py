"""AdminServicer handlers: tenant, account, key and audit administration, relayed to auth; dead
letters, served with storage and ingest (`dead_letters.py`).

AccessGuard lets only administrators through (platform admins everywhere, tenant admins to the
user and audit methods); auth confines a tenant admin to its tenant, named in the metadata; auth audits every call it serves with
the admin as actor (from the metadata the relay adds), and the gateway audits the dead-letter
calls itself. Each relayed public message is wire-identical to its twin in streammesh.auth.v1 or
streammesh.storage.v1 (tests/test_api_contract.py checks it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.gateway.audit import AuditTrail
from services.gateway.dead_letters import DeadLetterAdmin
from services.gateway.relay import auth_metadata, relay
from services.gateway.upstream import Upstreams
from streammesh.api.auth.v1 import auth_pb2
from streammesh.api.gateway.v1 import admin_pb2, admin_pb2_grpc

__all__ = ["AdminServicer"]

M = TypeVar("M", bound=Message)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Tenant, account, key and audit methods relay to the AuthService method of the same
    name."""

    def __init__(self, upstreams: Upstreams, audit: AuditTrail) -> None:
        self._up = upstreams
        self._dead_letters = DeadLetterAdmin(upstreams, audit)

    async def _auth(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Message,
        internal_request: type[Message],
        public_response: type[M],
        context: grpc.aio.ServicerContext,
    ) -> M:
        return await relay(
            "auth",
            method,
            request,
            internal_request,
            public_response,
            context,
            metadata=auth_metadata(context),
        )

    async def ListUsers(
        self, request: admin_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListUsersResponse:
        return await self._auth(
            self._up.auth.ListUsers,
            request,
            auth_pb2.ListUsersRequest,
            admin_pb2.ListUsersResponse,
            context,
        )

    async def CreateUser(
        self, request: admin_pb2.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateUserResponse:
        return await self._auth(
            self._up.auth.CreateUser,
            request,
            auth_pb2.CreateUserRequest,
            admin_pb2.CreateUserResponse,
            context,
        )

    async def SetUserDisabled(
        self, request: admin_pb2.SetUserDisabledRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetUserDisabledResponse:
        return await self._auth(
            self._up.auth.SetUserDisabled,
            request,
            auth_pb2.SetUserDisabledRequest,
            admin_pb2.SetUserDisabledResponse,
            context,
        )

    async def SetUserRoles(
        self, request: admin_pb2.SetUserRolesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetUserRolesResponse:
        return await self._auth(
            self._up.auth.SetUserRoles,
            request,
            auth_pb2.SetUserRolesRequest,
            admin_pb2.SetUserRolesResponse,
            context,
        )

    async def ResetMfa(
        self, request: admin_pb2.ResetMfaRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ResetMfaResponse:
        return await self._auth(
            self._up.auth.ResetMfa,
            request,
            auth_pb2.ResetMfaRequest,
            admin_pb2.ResetMfaResponse,
            context,
        )

    async def UnlockUser(
        self, request: admin_pb2.UnlockUserRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.UnlockUserResponse:
        return await self._auth(
            self._up.auth.UnlockUser,
            request,
            auth_pb2.UnlockUserRequest,
            admin_pb2.UnlockUserResponse,
            context,
        )

    async def RevokeSessions(
        self, request: admin_pb2.RevokeSessionsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeSessionsResponse:
        return await self._auth(
            self._up.auth.RevokeSessions,
            request,
            auth_pb2.RevokeSessionsRequest,
            admin_pb2.RevokeSessionsResponse,
            context,
        )

    async def ListSigningKeys(
        self, request: admin_pb2.ListSigningKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListSigningKeysResponse:
        return await self._auth(
            self._up.auth.ListSigningKeys,
            request,
            auth_pb2.ListSigningKeysRequest,
            admin_pb2.ListSigningKeysResponse,
            context,
        )

    async def RotateSigningKey(
        self, request: admin_pb2.RotateSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RotateSigningKeyResponse:
        return await self._auth(
            self._up.auth.RotateSigningKey,
            request,
            auth_pb2.RotateSigningKeyRequest,
            admin_pb2.RotateSigningKeyResponse,
            context,
        )

    async def RetireSigningKey(
        self, request: admin_pb2.RetireSigningKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RetireSigningKeyResponse:
        return await self._auth(
            self._up.auth.RetireSigningKey,
            request,
            auth_pb2.RetireSigningKeyRequest,
            admin_pb2.RetireSigningKeyResponse,
            context,
        )

    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuditEventsResponse:
        return await self._auth(
            self._up.auth.ListAuditEvents,
            request,
            auth_pb2.ListAuditEventsRequest,
            admin_pb2.ListAuditEventsResponse,
            context,
        )

    async def CreateTenant(
        self, request: admin_pb2.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateTenantResponse:
        return await self._auth(
            self._up.auth.CreateTenant,
            request,
            auth_pb2.CreateTenantRequest,
            admin_pb2.CreateTenantResponse,
            context,
        )

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListTenantsResponse:
        return await self._auth(
            self._up.auth.ListTenants,
            request,
            auth_pb2.ListTenantsRequest,
            admin_pb2.ListTenantsResponse,
            context,
        )

    async def GetTenant(
        self, request: admin_pb2.GetTenantRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetTenantResponse:
        return await self._auth(
            self._up.auth.GetTenant,
            request,
            auth_pb2.GetTenantRequest,
            admin_pb2.GetTenantResponse,
            context,
        )

    async def SetTenantDisabled(
        self, request: admin_pb2.SetTenantDisabledRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetTenantDisabledResponse:
        return await self._auth(
            self._up.auth.SetTenantDisabled,
            request,
            auth_pb2.SetTenantDisabledRequest,
            admin_pb2.SetTenantDisabledResponse,
            context,
        )

    async def ListDeadLetters(
        self, request: admin_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDeadLettersResponse:
        return await self._dead_letters.list_dead_letters(request, context)

    async def GetDeadLetter(
        self, request: admin_pb2.GetDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetDeadLetterResponse:
        return await self._dead_letters.get_dead_letter(request, context)

    async def ReplayDeadLetter(
        self, request: admin_pb2.ReplayDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReplayDeadLetterResponse:
        return await self._dead_letters.replay(request, context)
