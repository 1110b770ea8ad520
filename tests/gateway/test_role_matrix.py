"""Every method of GatewayService and AdminService, called by every kind of caller (no token,
producer, analyst, admin, producer+analyst) with real tokens from auth. A refused call gets the
exact code (and an audit row); an allowed one gets past the gateway, whatever the upstream then
answers to an empty request.

The expected matrix is written out here from the API's comments, not derived from the gateway's
table, so a change to the table that the API does not announce fails here.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.gateway.tokens import INVALID_TOKEN
from streammesh.api.gateway.v1 import admin_pb2, gateway_pb2, schema_registry_pb2
from tests.gateway.conftest import Stack, audit_events

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
SCHEMAS = schema_registry_pb2.DESCRIPTOR.services_by_name["SchemaRegistryService"]
MODULES = {
    GATEWAY.full_name: gateway_pb2,
    ADMIN.full_name: admin_pb2,
    SCHEMAS.full_name: schema_registry_pb2,
}

CALLERS = ["none", "producer", "analyst", "admin", "producer+analyst", "schema-admin"]
PUBLIC = {
    "Register",
    "BeginTotpEnrollment",
    "ConfirmTotpEnrollment",
    "StartLogin",
    "CompleteLogin",
    "RefreshSession",
    "Logout",
    "GetJwks",
}
NEEDS = {
    "Publish": {"producer", "admin"},
    "PublishBatch": {"producer", "admin"},
    "QueryEvents": {"analyst", "admin"},
    "SubscribeEvents": {"analyst", "admin"},
    "CountEvents": {"analyst", "admin"},
    "AggregateEvents": {"analyst", "admin"},
}
_SCHEMA_READERS = {"producer", "analyst", "schema-admin", "admin"}
SCHEMA_NEEDS = {
    "GetSchema": _SCHEMA_READERS,
    "ListSubjects": _SCHEMA_READERS,
    "ListSchemaVersions": _SCHEMA_READERS,
    "CheckCompatibility": _SCHEMA_READERS,
    "GetSchemaPolicy": _SCHEMA_READERS,
    "RegisterSchema": {"schema-admin", "admin"},
    "SetCompatibility": {"schema-admin", "admin"},
    "SetSchemaPolicy": {"schema-admin", "admin"},
}
"""Roles that may call each SchemaRegistryService method (from its service comment)."""
"""Roles that may call each role-guarded GatewayService method; every AdminService method
needs admin."""


def _allowed(caller: str, service: str, method: str) -> bool:
    roles = set() if caller == "none" else set(caller.split("+"))
    if service == ADMIN.full_name:
        return "admin" in roles
    if service == SCHEMAS.full_name:
        return bool(roles & SCHEMA_NEEDS[method])
    if method in PUBLIC:
        return True
    return bool(roles & NEEDS[method])


def _expected_refusal(caller: str) -> grpc.StatusCode:
    return (
        grpc.StatusCode.UNAUTHENTICATED if caller == "none" else grpc.StatusCode.PERMISSION_DENIED
    )


CASES = [
    pytest.param(caller, service, method, id=f"{caller}-{method.name}")
    for service in (GATEWAY, ADMIN, SCHEMAS)
    for method in service.methods
    for caller in CALLERS
]


def test_the_matrix_covers_every_method() -> None:
    assert {m.name for m in GATEWAY.methods} == PUBLIC | set(NEEDS)
    assert {m.name for m in SCHEMAS.methods} == set(SCHEMA_NEEDS)
    methods = len(GATEWAY.methods) + len(ADMIN.methods) + len(SCHEMAS.methods)
    assert len(CASES) == len(CALLERS) * methods


async def _call(
    stack: Stack, method: MethodDescriptor, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.StatusCode, str]:
    """Call `method` with an empty request over the real channel; the status and message."""
    module: Any = MODULES[method.containing_service.full_name]
    request: Message = getattr(module, method.input_type.name)()
    response_type: Any = getattr(module, method.output_type.name)
    path = f"/{method.containing_service.full_name}/{method.name}"
    channel = stack.gateway_channel
    try:
        if method.client_streaming:
            call = channel.stream_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )(iter([request]), metadata=metadata, timeout=10)
            async for _ in call:
                pass
        elif method.server_streaming:  # a subscription: its first message shows it was let in
            stream = channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )(request, metadata=metadata, timeout=10)
            await stream.read()
            stream.cancel()
        else:
            await channel.unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(("caller", "service", "method"), CASES)
async def test_role_matrix(
    stack: Stack, caller: str, service: Any, method: MethodDescriptor
) -> None:
    metadata = () if caller == "none" else stack.people[caller].bearer()
    since = dt.datetime.now(dt.UTC)
    code, details = await _call(stack, method, metadata)
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details
    assert code != grpc.StatusCode.UNIMPLEMENTED, details
    if _allowed(caller, service.full_name, method.name):
        # Past the gateway and answered by the upstream, which may refuse an empty request
        # (INVALID_ARGUMENT; auth's own UNAUTHENTICATED for missing credentials on a public
        # method), but never with the gateway's refusals, and it must have been reached.
        assert code not in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ), details
        if code == grpc.StatusCode.UNAUTHENTICATED:
            assert method.name in PUBLIC and details != INVALID_TOKEN, details
        return
    assert code == _expected_refusal(caller), details
    full_method = f"{service.full_name}/{method.name}"
    if caller == "none":
        assert details == INVALID_TOKEN
        action, reason, actor = "token_invalid", "missing_token", "anonymous"
    else:
        assert details.startswith(f"/{full_method} needs the role"), details
        action, reason, actor = (
            "access_denied",
            "role_missing",
            (f"user:{stack.people[caller].username}"),
        )

    def ours(event: admin_pb2.AuditEvent) -> bool:
        return event.details.get("method") == full_method and event.actor == actor

    events = await audit_events(stack, since=since, action=action, match=ours)
    assert len(events) == 1
    assert (events[0].reason, events[0].source) == (reason, "127.0.0.1")


async def test_health_and_reflection_are_public(stack: Stack) -> None:
    channel = stack.gateway_channel
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", GATEWAY.full_name, ADMIN.full_name):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in reflection.ServerReflectionInfo(iter([request]), timeout=10):
        names = {s.name for s in reply.list_services_response.service}
        assert {GATEWAY.full_name, ADMIN.full_name} <= names


async def test_admin_calls_reach_auth_as_the_admin(stack: Stack) -> None:
    """The relay names the admin (x-streammesh-actor) and the client address
    (x-streammesh-source) to auth, which audits administration with them."""
    admin = stack.admin_person
    since = dt.datetime.now(dt.UTC)
    reply = await stack.admin.SetUserRoles(
        admin_pb2.SetUserRolesRequest(username=stack.people["analyst"].username, roles=["analyst"]),
        metadata=admin.bearer(),
        timeout=10,
    )
    assert list(reply.user.roles) == ["analyst"]
    request = admin_pb2.ListAuditEventsRequest(action="role_change", page_size=10)
    request.start_time.FromDatetime(since)
    events = (
        await stack.admin.ListAuditEvents(request, metadata=admin.bearer(), timeout=10)
    ).events
    assert [(e.actor, e.subject, e.source) for e in events] == [
        (f"user:{admin.username}", stack.people["analyst"].username, "127.0.0.1")
    ]
