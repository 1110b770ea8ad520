"""The server's interceptor list on a real mTLS server: gRPC server metrics for every arity and
status (go-grpc-prometheus names and labels), the default deadline and the time left as the
handler sees it, and a layer of one's own built on the one helper."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from streammesh.mesh import MeshServer
from streammesh.mesh.interceptors import Layer, LayerInterceptor, Rpc
from tests.mesh.arity import SERVICE, arity_server, call, channel_to

TYPES = {
    "UnaryUnary": "unary",
    "UnaryStream": "server_stream",
    "StreamUnary": "client_stream",
    "StreamStream": "bidi_stream",
}


@pytest.fixture
async def mesh(pki_dir: Path) -> AsyncIterator[MeshServer]:
    server = arity_server(pki_dir, default_deadline_seconds=0.5)
    await server.start()
    yield server
    await server.stop(0)


def sample(mesh: MeshServer, name: str, method: str, **labels: str) -> float:
    grpc_type = TYPES.get(method, "server_stream" if "Stream" in method else "unary")
    if method in ("Endless",):
        grpc_type = "server_stream"
    value = mesh.metrics.registry.get_sample_value(
        name,
        {"grpc_type": grpc_type, "grpc_service": SERVICE, "grpc_method": method, **labels},
    )
    return 0.0 if value is None else value


async def settled(check: Any, timeout: float = 5.0) -> None:
    """Wait until `check()` holds: the server records a call after the client saw its end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "the server did not record the call in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("method", "kids", "sent"),
    [
        ("UnaryUnary", ["a"], 1),
        ("UnaryStream", ["a"], 2),
        ("StreamUnary", ["a", "b", "c"], 1),
        ("StreamStream", ["a", "b", "c"], 3),
    ],
)
async def test_every_arity_is_counted_with_its_messages(
    mesh: MeshServer, pki_dir: Path, method: str, kids: list[str], sent: int
) -> None:
    async with channel_to(mesh, pki_dir) as channel:
        answers = await call(channel, method, kids)
    assert len(answers) == sent
    await settled(lambda: sample(mesh, "grpc_server_handled_total", method, grpc_code="OK") == 1)
    assert sample(mesh, "grpc_server_started_total", method) == 1
    assert sample(mesh, "grpc_server_msg_received_total", method) == len(kids)
    assert sample(mesh, "grpc_server_msg_sent_total", method) == sent
    assert sample(mesh, "grpc_server_handling_seconds_count", method) == 1
    assert 0 < sample(mesh, "grpc_server_handling_seconds_sum", method) < 5


async def test_statuses_are_counted_with_go_code_names(mesh: MeshServer, pki_dir: Path) -> None:
    async with channel_to(mesh, pki_dir) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "NotFound")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        undecodable = channel.unary_unary(f"/{SERVICE}/UnaryUnary")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await undecodable(b"\xff\xff\xff", timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with channel_to(mesh, pki_dir, who="ingest") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "UnaryStream")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await settled(
        lambda: (
            sample(mesh, "grpc_server_handled_total", "UnaryStream", grpc_code="PermissionDenied")
            == 1
        )
    )
    assert sample(mesh, "grpc_server_handled_total", "NotFound", grpc_code="NotFound") == 1
    assert sample(mesh, "grpc_server_handled_total", "UnaryUnary", grpc_code="InvalidArgument") == 1
    assert sample(mesh, "grpc_server_handled_total", "UnaryUnary", grpc_code="OK") == 0


async def test_methods_of_the_bound_services_start_at_zero(pki_dir: Path) -> None:
    from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc
    from streammesh.mesh import PeerPolicy, ServiceBinding, ServiceSettings, create_mesh_server
    from tests.conftest import TRUST_DOMAIN

    class Status(processor_pb2_grpc.ProcessorServiceServicer):
        async def GetStatus(
            self, request: processor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
        ) -> processor_pb2.GetStatusResponse:
            return processor_pb2.GetStatusResponse()

    server = create_mesh_server(
        ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN),
        identity="processor",
        bindings=[
            ServiceBinding(
                processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
                processor_pb2_grpc.add_ProcessorServiceServicer_to_server,
                Status(),
            )
        ],
        guard=PeerPolicy.build(TRUST_DOMAIN, {}),
    )
    labels = {
        "grpc_type": "unary",
        "grpc_service": "streammesh.processor.v1.ProcessorService",
        "grpc_method": "GetStatus",
    }
    registry = server.metrics.registry
    assert registry.get_sample_value("grpc_server_started_total", labels) == 0
    assert (
        registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 0
    )


async def test_a_call_without_a_deadline_gets_the_services_default(
    mesh: MeshServer, pki_dir: Path
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with channel_to(mesh, pki_dir) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Slow", timeout=None)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "default deadline" in (caught.value.details() or "")
    assert 0.4 < loop.time() - started < 5
    await settled(
        lambda: sample(mesh, "grpc_server_handled_total", "Slow", grpc_code="DeadlineExceeded") == 1
    )


async def test_a_client_deadline_ends_the_call_and_is_counted(
    mesh: MeshServer, pki_dir: Path
) -> None:
    async with channel_to(mesh, pki_dir) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(channel, "Slow", timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def ended(code: str) -> float:
        return sample(mesh, "grpc_server_handled_total", "Slow", grpc_code=code)

    # The server's copy of the deadline passes a little after the client's (it travels as a
    # timeout, rounded up); when the client's cancellation arrives first, the server saw a
    # cancel, as a Go server would count it too.
    await settled(lambda: ended("DeadlineExceeded") + ended("Canceled") == 1)


async def test_the_handler_sees_the_time_left(mesh: MeshServer, pki_dir: Path) -> None:
    async with channel_to(mesh, pki_dir) as channel:
        with_client_deadline = float((await call(channel, "Remaining", timeout=20))[0])
        with_default = float((await call(channel, "Remaining", timeout=None))[0])
        stream_without = (await call(channel, "RemainingStream", timeout=None))[0]
        stream_with = float((await call(channel, "RemainingStream", timeout=20))[0])
    # gRPC rounds the deadline it sends up (grpc-timeout has coarse units): a little over 20.
    assert 15 < with_client_deadline <= 21
    assert 0 < with_default <= 0.5
    assert stream_without == "None"  # streams get no default deadline
    assert 15 < stream_with <= 21


async def test_a_client_that_goes_away_is_counted_as_canceled(
    mesh: MeshServer, pki_dir: Path
) -> None:
    async with channel_to(mesh, pki_dir) as channel:
        stream = channel.unary_stream(f"/{SERVICE}/Endless")(b"", timeout=None)
        async for _ in stream:
            break
        stream.cancel()
    await settled(
        lambda: sample(mesh, "grpc_server_handled_total", "Endless", grpc_code="Canceled") == 1
    )
    assert sample(mesh, "grpc_server_msg_sent_total", "Endless") >= 1


class Recorder(LayerInterceptor):
    """A layer of one's own: records what each hook saw."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def layer(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> Layer:
        events = self.events

        class Recording(Layer):
            async def enter(self, request: Any, context: Any) -> tuple[Any, Any]:
                events.append(("enter", rpc.name))
                return request, rpc.grpc_type

            def sent(self, state: Any) -> None:
                events.append(("sent", state))

            async def leave(self, state: Any, context: Any, error: BaseException | None) -> bool:
                events.append(("leave", type(error).__name__ if error else "ok"))
                return False

        return Recording()


async def test_a_custom_list_wraps_every_arity_with_one_helper(pki_dir: Path) -> None:
    from streammesh.mesh.interceptors import ErrorInterceptor

    recorder = Recorder()
    server = arity_server(pki_dir, interceptors=[ErrorInterceptor(), recorder])
    await server.start()
    try:
        async with channel_to(server, pki_dir, who="ingest") as channel:
            # No guard in this list: the ingest identity may call; decoding still applies.
            assert await call(channel, "StreamStream", ["a", "b"]) == ["a", "b"]
            assert await call(channel, "UnaryStream") == ["a", "a"]
            assert await call(channel, "StreamUnary", ["x", "y"]) == ["x,y"]
            assert await call(channel, "UnaryUnary") == ["a"]
            with pytest.raises(grpc.aio.AioRpcError):
                await call(channel, "NotFound")
    finally:
        await server.stop(0)
    assert recorder.events == [
        ("enter", "StreamStream"),
        ("sent", "bidi_stream"),
        ("sent", "bidi_stream"),
        ("leave", "ok"),
        ("enter", "UnaryStream"),
        ("sent", "server_stream"),
        ("sent", "server_stream"),
        ("leave", "ok"),
        ("enter", "StreamUnary"),
        ("sent", "client_stream"),
        ("leave", "ok"),
        ("enter", "UnaryUnary"),
        ("sent", "unary"),
        ("leave", "ok"),
        ("enter", "NotFound"),
        ("leave", "NotFound"),
    ]


async def test_client_and_server_count_the_same_calls_over_mtls(
    mesh: MeshServer, pki_dir: Path
) -> None:
    from streammesh.mesh import TlsMaterial, create_channel
    from streammesh.mesh.metrics import ServiceMetrics, client_interceptors

    gateway = ServiceMetrics("gateway")
    channel = create_channel(
        f"127.0.0.1:{mesh.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="processor",
        config={"methodConfig": []},
        interceptors=client_interceptors(gateway.grpc_client),
    )
    async with channel:
        await call(channel, "StreamStream", ["a", "b"])
        with pytest.raises(grpc.aio.AioRpcError):
            await call(channel, "NotFound")
    labels = {"grpc_type": "bidi_stream", "grpc_service": SERVICE, "grpc_method": "StreamStream"}
    client = gateway.registry.get_sample_value
    assert client("grpc_client_handled_total", {**labels, "grpc_code": "OK"}) == 1
    assert client("grpc_client_msg_sent_total", labels) == 2
    assert client("grpc_client_msg_received_total", labels) == 2
    not_found = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "NotFound"}
    assert client("grpc_client_handled_total", {**not_found, "grpc_code": "NotFound"}) == 1
    await settled(
        lambda: sample(mesh, "grpc_server_handled_total", "NotFound", grpc_code="NotFound") == 1
    )
    assert sample(mesh, "grpc_server_msg_received_total", "StreamStream") == 2
