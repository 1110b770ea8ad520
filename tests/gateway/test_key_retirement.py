"""Key rotation and retirement through AdminService, seen from the gateway: tokens of a retired
key stop verifying within jwks_max_age_seconds (1 s here, 60 s by default), and tokens of the new
key verify at once (an unknown kid triggers a JWKS refetch)."""

from __future__ import annotations

import asyncio
import time

import grpc
import jwt

from services.gateway.settings import GatewaySettings
from services.gateway.tokens import INVALID_TOKEN
from streammesh.api.gateway.v1 import admin_pb2, gateway_pb2
from tests.gateway.conftest import Person, Stack, enrol_and_login

MAX_AGE = 1.0
GATEWAY_SETTINGS = {"jwks_max_age_seconds": MAX_AGE, "jwks_min_refetch_seconds": 0.5}


async def _count(stack: Stack, person: Person) -> grpc.StatusCode:
    try:
        await stack.gateway.CountEvents(
            gateway_pb2.CountEventsRequest(), metadata=person.bearer(), timeout=10
        )
    except grpc.aio.AioRpcError as error:
        assert error.code() != grpc.StatusCode.UNAUTHENTICATED or error.details() == INVALID_TOKEN
        return error.code()
    return grpc.StatusCode.OK


def _kid(person: Person) -> str:
    return str(jwt.get_unverified_header(person.access_token)["kid"])


async def test_a_retired_key_stops_working_within_the_jwks_max_age(stack: Stack) -> None:
    admin, analyst = stack.admin_person, stack.people["analyst"]
    old_kid = _kid(analyst)
    assert await _count(stack, analyst) == grpc.StatusCode.OK

    rotated = await stack.admin.RotateSigningKey(
        admin_pb2.RotateSigningKeyRequest(), metadata=admin.bearer(), timeout=10
    )
    assert rotated.active.kid != old_kid
    assert await _count(stack, analyst) == grpc.StatusCode.OK  # still published (overlap)

    newcomer = await enrol_and_login(stack, f"gw-new-{int(time.time() * 1000)}", ("analyst",))
    assert _kid(newcomer) == rotated.active.kid
    assert await _count(stack, newcomer) == grpc.StatusCode.OK  # unknown kid -> refetch

    await stack.admin.RetireSigningKey(
        admin_pb2.RetireSigningKeyRequest(kid=old_kid), metadata=admin.bearer(), timeout=10
    )
    retired_at = time.monotonic()
    while await _count(stack, analyst) == grpc.StatusCode.OK:
        assert time.monotonic() - retired_at < MAX_AGE + 1, "retired key still accepted"
        await asyncio.sleep(0.05)
    assert await _count(stack, analyst) == grpc.StatusCode.UNAUTHENTICATED
    assert await _count(stack, newcomer) == grpc.StatusCode.OK


def test_the_default_revocation_bound_is_a_minute() -> None:
    info = GatewaySettings.model_fields["jwks_max_age_seconds"]
    assert info.default == 60
    assert "retire" in (info.description or "")
