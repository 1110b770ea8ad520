"""streammesh.gateway.v1.SchemaRegistryService: relayed to storage's registry, each request
re-typed (the public messages are wire-identical to the internal ones minus `tenant`, which
tests/test_api_contract.py checks) and given the caller's tenant. AccessGuard checked the role
before any handler runs."""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.gateway.access import current_principal
from services.gateway.relay import call_timeout, convert
from services.gateway.upstream import Upstreams, upstream_errors
from streammesh.api.gateway.v1 import schema_registry_pb2 as public
from streammesh.api.gateway.v1 import schema_registry_pb2_grpc as public_grpc
from streammesh.api.storage.v1 import schema_registry_pb2 as internal

__all__ = ["SchemaRegistryServicer"]

M = TypeVar("M", bound=Message)


class SchemaRegistryServicer(public_grpc.SchemaRegistryServiceServicer):
    def __init__(self, upstreams: Upstreams) -> None:
        self._up = upstreams

    async def _relay(
        self,
        name: str,
        request: Message,
        internal_request: type[Any],
        public_response: type[M],
        context: grpc.aio.ServicerContext,
    ) -> M:
        message = convert(request, internal_request)
        message.tenant = current_principal().tenant
        with upstream_errors("storage"):
            reply = await getattr(self._up.registry, name)(message, timeout=call_timeout(context))
        return convert(reply, public_response)

    async def RegisterSchema(
        self, request: public.RegisterSchemaRequest, context: grpc.aio.ServicerContext
    ) -> public.RegisterSchemaResponse:
        return await self._relay(
            "RegisterSchema",
            request,
            internal.RegisterSchemaRequest,
            public.RegisterSchemaResponse,
            context,
        )

    async def CheckCompatibility(
        self, request: public.CheckCompatibilityRequest, context: grpc.aio.ServicerContext
    ) -> public.CheckCompatibilityResponse:
        return await self._relay(
            "CheckCompatibility",
            request,
            internal.CheckCompatibilityRequest,
            public.CheckCompatibilityResponse,
            context,
        )

    async def GetSchema(
        self, request: public.GetSchemaRequest, context: grpc.aio.ServicerContext
    ) -> public.GetSchemaResponse:
        return await self._relay(
            "GetSchema", request, internal.GetSchemaRequest, public.GetSchemaResponse, context
        )

    async def ListSubjects(
        self, request: public.ListSubjectsRequest, context: grpc.aio.ServicerContext
    ) -> public.ListSubjectsResponse:
        return await self._relay(
            "ListSubjects",
            request,
            internal.ListSubjectsRequest,
            public.ListSubjectsResponse,
            context,
        )

    async def ListSchemaVersions(
        self, request: public.ListSchemaVersionsRequest, context: grpc.aio.ServicerContext
    ) -> public.ListSchemaVersionsResponse:
        return await self._relay(
            "ListSchemaVersions",
            request,
            internal.ListSchemaVersionsRequest,
            public.ListSchemaVersionsResponse,
            context,
        )

    async def SetCompatibility(
        self, request: public.SetCompatibilityRequest, context: grpc.aio.ServicerContext
    ) -> public.SetCompatibilityResponse:
        return await self._relay(
            "SetCompatibility",
            request,
            internal.SetCompatibilityRequest,
            public.SetCompatibilityResponse,
            context,
        )

    async def GetSchemaPolicy(
        self, request: public.GetSchemaPolicyRequest, context: grpc.aio.ServicerContext
    ) -> public.GetSchemaPolicyResponse:
        return await self._relay(
            "GetSchemaPolicy",
            request,
            internal.GetSchemaPolicyRequest,
            public.GetSchemaPolicyResponse,
            context,
        )

    async def SetSchemaPolicy(
        self, request: public.SetSchemaPolicyRequest, context: grpc.aio.ServicerContext
    ) -> public.SetSchemaPolicyResponse:
        return await self._relay(
            "SetSchemaPolicy",
            request,
            internal.SetSchemaPolicyRequest,
            public.SetSchemaPolicyResponse,
            context,
        )
