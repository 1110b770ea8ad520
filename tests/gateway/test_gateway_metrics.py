"""The gateway's token refusals on its real /metrics, by reason, after real calls over TLS
against a real stack: every reason is reported from 0 on, a valid token counts nothing."""

from __future__ import annotations

import contextlib
from typing import cast

import grpc

from services.gateway.server import create_server
from services.gateway.tokens import Reason
from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.conftest import GatewayStub, Stack, _gateway_parts, _started, gateway_channel
from tests.mesh.test_metrics_endpoint import free_port, scrape


async def _count(stub: GatewayStub, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    try:
        await stub.CountEvents(gateway_pb2.CountEventsRequest(), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_refused_tokens_are_counted_by_reason(stack: Stack) -> None:
    port = free_port()
    settings = stack.gateway_settings.model_copy(update={"metrics_port": port})
    async with contextlib.AsyncExitStack() as exit_stack:
        parts = await _gateway_parts(settings, stack.pki_dir, exit_stack)
        mesh = await _started(create_server(settings, *parts[:3]), exit_stack)
        channel = gateway_channel(mesh.port, stack.pki_dir)
        exit_stack.push_async_callback(channel.close)
        stub = cast(GatewayStub, gateway_pb2_grpc.GatewayServiceStub(channel))
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        assert await _count(stub, ()) == unauthenticated
        assert await _count(stub, (("authorization", "Bearer not-a-jwt"),)) == unauthenticated
        assert await _count(stub, (("authorization", "Bearer a.b.c"),)) == unauthenticated
        assert await _count(stub, stack.people["analyst"].bearer()) == grpc.StatusCode.OK
        samples = await scrape(port)
    refusals = {
        labels[0][1]: count
        for (name, labels), count in samples.items()
        if name == "streammesh_gateway_token_refusals_total"
    }
    assert set(refusals) == {str(reason) for reason in Reason}
    assert refusals.pop("missing_token") == 1
    assert refusals.pop("malformed") == 2  # not three parts; a header that is no JSON
    assert set(refusals.values()) == {0}
