"""A test service with one method per arity on a real mTLS mesh server, and calls to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh import MeshServer, PeerPolicy, TlsMaterial, create_channel, create_mesh_server
from streammesh.mesh.errors import NotFound
from streammesh.mesh.interceptors import time_remaining
from streammesh.mesh.settings import ServiceSettings
from tests.conftest import TRUST_DOMAIN

__all__ = ["SERVICE", "Arity", "Message", "arity_server", "call", "channel_to"]

SERVICE = "test.v1.Arity"
# Any message with a string field will do: handlers echo `kid` back in the same type.
Message = auth_pb2.RetireSigningKeyRequest


class Arity:
    """Handlers of the four arities, and a few that misbehave."""

    async def unary_unary(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return Message(kid=request.kid)

    async def unary_stream(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        for _ in range(2):
            yield Message(kid=request.kid)

    async def stream_unary(
        self, requests: AsyncIterator[Message], context: grpc.aio.ServicerContext
    ) -> Message:
        kids = [request.kid async for request in requests]
        return Message(kid=",".join(kids))

    async def stream_stream(
        self, requests: AsyncIterator[Message], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        async for request in requests:
            yield Message(kid=request.kid)

    async def not_found(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        raise NotFound(f"no key {request.kid!r}")

    async def slow(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        await asyncio.sleep(30)
        return Message()

    async def remaining(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return Message(kid=repr(time_remaining()))

    async def remaining_stream(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        yield Message(kid=repr(time_remaining()))

    async def endless(
        self, request: Message, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        while True:
            yield Message(kid="tick")
            await asyncio.sleep(0.01)


ARITIES = {
    "UnaryUnary": (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    "UnaryStream": (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    "StreamUnary": (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    "StreamStream": (grpc.stream_stream_rpc_method_handler, "stream_stream"),
    "NotFound": (grpc.unary_unary_rpc_method_handler, "not_found"),
    "Slow": (grpc.unary_unary_rpc_method_handler, "slow"),
    "Remaining": (grpc.unary_unary_rpc_method_handler, "remaining"),
    "RemainingStream": (grpc.unary_stream_rpc_method_handler, "remaining_stream"),
    "Endless": (grpc.unary_stream_rpc_method_handler, "endless"),
}
_STREAMS = {
    "UnaryUnary": (False, False),
    "UnaryStream": (False, True),
    "StreamUnary": (True, False),
    "StreamStream": (True, True),
}


def arity_server(
    pki_dir: Path,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    **settings: Any,
) -> MeshServer:
    """A mesh server (not started) hosting `Arity`; the gateway may call it."""
    mesh = create_mesh_server(
        ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, **settings),
        identity="processor",
        bindings=[],
        guard=PeerPolicy.build(TRUST_DOMAIN, {f"{SERVICE}/*": ["service/gateway"]}),
        interceptors=interceptors,
    )
    arity = Arity()
    handlers = {
        name: factory(
            getattr(arity, attribute),
            request_deserializer=Message.FromString,
            response_serializer=Message.SerializeToString,
        )
        for name, (factory, attribute) in ARITIES.items()
    }
    mesh.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    return mesh


def channel_to(mesh: MeshServer, pki_dir: Path, who: str = "gateway") -> grpc.aio.Channel:
    return create_channel(
        f"127.0.0.1:{mesh.port}",
        TlsMaterial.load(pki_dir, who),
        server_name="processor",
        config={"methodConfig": []},
    )


async def call(
    channel: grpc.aio.Channel,
    method: str,
    kids: Sequence[str] = ("a",),
    *,
    timeout: float | None = 10,
) -> list[str]:
    """Call `method` with one request per kid (one unless it streams requests); the kids of the
    answers."""
    requests, responses = _STREAMS.get(method, (False, method in ("RemainingStream", "Endless")))
    path = f"/{SERVICE}/{method}"
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    multi = kinds[(requests, responses)](
        path, request_serializer=Message.SerializeToString, response_deserializer=Message.FromString
    )

    async def stream() -> AsyncIterator[Message]:
        for kid in kids:
            yield Message(kid=kid)

    invocation: Any = multi(stream() if requests else Message(kid=kids[0]), timeout=timeout)
    if responses:
        return [answer.kid async for answer in invocation]
    return [(await invocation).kid]
