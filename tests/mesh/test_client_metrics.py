"""The grpc_client_* interceptors on a plain grpc.aio channel to a plain in-process server:
every arity, both request styles (iterator, write/done_writing), statuses, and a call's
metadata and trailers left intact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from streammesh.mesh.metrics import GrpcMetrics, client_interceptors

SERVICE = "test.v1.Plain"


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"missing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    await context.send_initial_metadata((("x-served-by", "plain"),))
    context.set_trailing_metadata((("x-trailer", "kept"),))
    return request


async def _server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


async def _client_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> bytes:
    return b",".join([request async for request in requests])


async def _bidi(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        if request == b"fail":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")
        yield request


async def _slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(10)
    return request


@pytest.fixture
async def target() -> AsyncIterator[str]:
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def channel(target: str, registry: CollectorRegistry) -> AsyncIterator[grpc.aio.Channel]:
    metrics = GrpcMetrics(registry, side="client")
    async with grpc.aio.insecure_channel(target, interceptors=client_interceptors(metrics)) as ch:
        yield ch


def value(
    registry: CollectorRegistry, name: str, method: str, grpc_type: str, **labels: str
) -> float:
    found = registry.get_sample_value(
        name, {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method, **labels}
    )
    return 0.0 if found is None else found


async def _requests(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_a_unary_call_is_counted_and_keeps_its_metadata(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    call: Any = channel.unary_unary(f"/{SERVICE}/Unary")(b"hello", timeout=5)
    assert await call == b"hello"
    assert ("x-served-by", "plain") in tuple(await call.initial_metadata())
    assert ("x-trailer", "kept") in tuple(await call.trailing_metadata())
    assert await call.code() == grpc.StatusCode.OK
    args = ("Unary", "unary")
    assert value(registry, "grpc_client_started_total", *args) == 1
    assert value(registry, "grpc_client_handled_total", *args, grpc_code="OK") == 1
    assert value(registry, "grpc_client_msg_sent_total", *args) == 1
    assert value(registry, "grpc_client_msg_received_total", *args) == 1
    assert value(registry, "grpc_client_handling_seconds_count", *args) == 1


async def test_a_failed_unary_call_is_counted_with_its_code(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Unary")(b"missing", timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no such thing"
    args = ("Unary", "unary")
    assert value(registry, "grpc_client_handled_total", *args, grpc_code="NotFound") == 1
    assert value(registry, "grpc_client_msg_received_total", *args) == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=0.1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (
        value(registry, "grpc_client_handled_total", "Slow", "unary", grpc_code="DeadlineExceeded")
        == 1
    )


async def test_streams_count_each_message(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    answers = [a async for a in channel.unary_stream(f"/{SERVICE}/ServerStream")(b"x", timeout=5)]
    assert answers == [b"x"] * 3
    joined = await channel.stream_unary(f"/{SERVICE}/ClientStream")(
        _requests(b"a", b"b"), timeout=5
    )
    assert joined == b"a,b"
    bidi = channel.stream_stream(f"/{SERVICE}/Bidi")(_requests(b"1", b"2", b"3"), timeout=5)
    assert [a async for a in bidi] == [b"1", b"2", b"3"]
    for method, grpc_type, sent, received in [
        ("ServerStream", "server_stream", 1, 3),
        ("ClientStream", "client_stream", 2, 1),
        ("Bidi", "bidi_stream", 3, 3),
    ]:
        args = (method, grpc_type)
        assert value(registry, "grpc_client_started_total", *args) == 1, method
        assert value(registry, "grpc_client_handled_total", *args, grpc_code="OK") == 1, method
        assert value(registry, "grpc_client_msg_sent_total", *args) == sent, method
        assert value(registry, "grpc_client_msg_received_total", *args) == received, method
        assert value(registry, "grpc_client_handling_seconds_count", *args) == 1, method


async def test_a_written_stream_is_counted_and_its_error_too(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    call: Any = channel.stream_stream(f"/{SERVICE}/Bidi")(timeout=5)
    await call.write(b"one")
    assert await call.read() == b"one"
    await call.write(b"fail")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    args = ("Bidi", "bidi_stream")
    assert value(registry, "grpc_client_msg_sent_total", *args) == 2
    assert value(registry, "grpc_client_msg_received_total", *args) == 1
    assert value(registry, "grpc_client_handled_total", *args, grpc_code="FailedPrecondition") == 1


async def test_a_call_the_caller_cancels_is_counted_as_canceled(
    channel: grpc.aio.Channel, registry: CollectorRegistry
) -> None:
    task = asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=5))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert value(registry, "grpc_client_handled_total", "Slow", "unary", grpc_code="Canceled") == 1
