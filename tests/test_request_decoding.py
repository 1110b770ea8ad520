"""Requests that do not decode, through the guard interceptor on a real mTLS server: every arity
answers INVALID_ARGUMENT after the guard, logs one rate-limited warning and no traceback, and a
request stream that turns bad mid-way ends the call at once, whoever reads it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceSettings,
    TlsMaterial,
    create_channel,
    create_mesh_server,
)
from streammesh.mesh.logs import LogThrottle
from tests.conftest import TRUST_DOMAIN

SERVICE = "test.v1.Arity"
# Any message with a string field 1 will do; the handlers echo it back in the same type.
Request = auth_pb2.RetireSigningKeyRequest
Response = auth_pb2.RetireSigningKeyRequest
GOOD = Request(kid="fine").SerializeToString()
NOT_PROTOBUF = b"\xff\xff\xff"
BAD_UTF8 = b"\x0a\x02\xc3\x28"  # field 1 (kid, a string) holding an invalid UTF-8 pair


class Arity:
    """Handlers of the four arities that echo what they decoded; `seen` records it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def unary_unary(self, request: Request, context: grpc.aio.ServicerContext) -> Response:
        self.seen.append(request.kid)
        return Response(kid=request.kid)

    async def unary_stream(
        self, request: Request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        self.seen.append(request.kid)
        yield Response(kid=request.kid)

    async def stream_unary(
        self, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> Response:
        async for request in requests:
            self.seen.append(request.kid)
        return Response(kid="done")

    async def stream_stream(
        self, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        async for request in requests:
            self.seen.append(request.kid)
            yield Response(kid=request.kid)

    async def background_reader(
        self, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Response]:
        """Reads its requests in another task while it streams answers of its own, as a relay
        to an upstream does: the call is mostly inside gRPC's write of an answer, where a
        cancellation alone would end it without a status."""

        async def pump() -> None:
            async for request in requests:
                self.seen.append(request.kid)

        reader = asyncio.create_task(pump())
        reader.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            while True:
                yield Response(kid="tick")
                await asyncio.sleep(0.001)
        finally:
            reader.cancel()


ARITIES = {
    "UnaryUnary": (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    "UnaryStream": (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    "StreamUnary": (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    "StreamStream": (grpc.stream_stream_rpc_method_handler, "stream_stream"),
    "BackgroundReader": (grpc.stream_stream_rpc_method_handler, "background_reader"),
}


@pytest.fixture
async def arity() -> Arity:
    return Arity()


@pytest.fixture
async def server(pki_dir: Path, arity: Arity) -> AsyncIterator[MeshServer]:
    policy = PeerPolicy.build(TRUST_DOMAIN, {f"{SERVICE}/*": ["service/gateway"]})
    mesh = create_mesh_server(
        ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN),
        identity="processor",
        bindings=[],
        guard=policy,
    )
    handlers = {
        name: factory(
            getattr(arity, attribute),
            request_deserializer=Request.FromString,
            response_serializer=Response.SerializeToString,
        )
        for name, (factory, attribute) in ARITIES.items()
    }
    mesh.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    await mesh.start()
    yield mesh
    await mesh.stop(0)


async def _raw_call(
    server: MeshServer, pki_dir: Path, method: str, messages: Sequence[bytes], who: str = "gateway"
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send `messages` as raw bytes (one unless the method streams requests)."""
    channel = create_channel(
        f"127.0.0.1:{server.port}",
        TlsMaterial.load(pki_dir, who),
        server_name="processor",
        config={"methodConfig": []},
    )
    request_streaming = method.startswith(("Stream", "Background"))
    response_streaming = method in ("UnaryStream", "StreamStream", "BackgroundReader")
    factory = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(request_streaming, response_streaming)]
    call_factory = factory(
        f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
    )

    async def stream() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    answers: list[bytes] = []
    async with channel:
        call: Any = call_factory(stream() if request_streaming else messages[0], timeout=20)
        try:
            if response_streaming:
                async for answer in call:
                    answers.append(answer)
            else:
                answers.append(await call)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or "", answers
        return await call.code(), await call.details() or "", answers


@pytest.mark.parametrize("payload", [NOT_PROTOBUF, BAD_UTF8], ids=["not-protobuf", "bad-utf8"])
@pytest.mark.parametrize("method", ["UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream"])
async def test_undecodable_request_is_invalid_argument_with_one_warning(
    server: MeshServer,
    pki_dir: Path,
    arity: Arity,
    method: str,
    payload: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        code, details, _ = await _raw_call(server, pki_dir, method, [payload])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        "the request is not a valid streammesh.auth.v1.RetireSigningKeyRequest "
        "(bad protobuf, or a string not UTF-8)"
    )
    assert arity.seen == []
    warnings = [r for r in caplog.records if "undecodable request" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert f"/{SERVICE}/{method}" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_valid_requests_still_decode_for_every_arity(
    server: MeshServer, pki_dir: Path, arity: Arity
) -> None:
    for method in ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream"):
        code, _, answers = await _raw_call(server, pki_dir, method, [GOOD])
        assert code == grpc.StatusCode.OK, method
        assert answers and all(Response.FromString(answer) for answer in answers)
    assert arity.seen == ["fine"] * 4


async def test_the_guard_refuses_before_the_bytes_are_parsed(
    server: MeshServer, pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        code, details, _ = await _raw_call(
            server, pki_dir, "UnaryUnary", [NOT_PROTOBUF], who="ingest"
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "may not call" in details
    assert not [r for r in caplog.records if "undecodable" in r.getMessage()]


@pytest.mark.parametrize("method", ["StreamUnary", "StreamStream", "BackgroundReader"])
async def test_a_stream_that_turns_bad_ends_the_call_at_once(
    server: MeshServer,
    pki_dir: Path,
    arity: Arity,
    method: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING):
        code, _, answers = await _raw_call(server, pki_dir, method, [GOOD, BAD_UTF8, GOOD])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert loop.time() - started < 15, "ended by its deadline, not by the bad request"
    assert arity.seen == ["fine"]  # the good request before it was handled; none after
    if method == "StreamStream":
        assert [Response.FromString(a).kid for a in answers] == ["fine"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_flood_of_bad_requests_logs_a_line_a_second_at_most(
    server: MeshServer, pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        codes = [
            (await _raw_call(server, pki_dir, "UnaryUnary", [NOT_PROTOBUF]))[0] for _ in range(10)
        ]
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    warnings = [r for r in caplog.records if "undecodable request" in r.getMessage()]
    assert 1 <= len(warnings) < 10


def test_log_throttle_counts_what_it_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttle = LogThrottle(logging.getLogger("test.throttle"), interval=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for _ in range(5):
            throttle.warning("bad %s", "x")
        now[0] += 1.0
        throttle.warning("bad %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "bad x",
        "bad y (4 more warnings not logged)",
    ]


async def test_an_unimplemented_method_is_unimplemented_not_internal(
    server: MeshServer, pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The stock health servicer has no List: its base class raises NotImplementedError.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = create_channel(
        f"127.0.0.1:{server.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="processor",
        config={"methodConfig": []},
    )
    with caplog.at_level(logging.WARNING):
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(channel).List(
                    health_pb2.HealthListRequest(), timeout=5
                )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
