"""The innermost layer: requests decoded after the guard (see streammesh.mesh.decoding).

Every handler is registered with gRPC without its request deserializer, so that gRPC hands the
raw bytes through the layers; this one decodes them just before the handler, so a caller the
guard refused never has its bytes parsed, and bytes that do not decode become INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from streammesh.mesh.decoding import DecodedRequests, RequestDecoder
from streammesh.mesh.interceptors.base import Layer, LayerInterceptor, Rpc, wrap_rpc_behavior
from streammesh.mesh.logs import LogThrottle

__all__ = ["DecodeInterceptor"]


class _UnaryDecodeLayer(Layer):
    __slots__ = ("_decoder",)

    def __init__(self, decoder: RequestDecoder) -> None:
        self._decoder = decoder

    async def enter(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, Any]:
        return self._decoder(request, context), None


class _StreamDecodeLayer(Layer):
    __slots__ = ("_decoder",)

    def __init__(self, decoder: RequestDecoder) -> None:
        self._decoder = decoder

    async def enter(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, Any]:
        requests = DecodedRequests(request, self._decoder, context)
        return requests, requests

    async def leave(
        self,
        state: DecodedRequests,
        context: grpc.aio.ServicerContext,
        error: BaseException | None,
    ) -> bool:
        if not isinstance(error, asyncio.CancelledError) or not state.answered_elsewhere:
            return False
        # A background reader of the request stream found a message that did not decode,
        # answered the call and cancelled this task: nothing is left to say (gRPC sends the
        # recorded abort when the behaviour returns).
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True


class DecodeInterceptor(LayerInterceptor):
    """Decodes each request after every other layer; it must come last in the list (the server
    factory appends it)."""

    def __init__(self, *, throttle: LogThrottle) -> None:
        super().__init__()
        self._throttle = throttle

    def layer(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> Layer | None:
        deserializer = handler.request_deserializer
        if deserializer is None:
            return None
        decoder = RequestDecoder(rpc.method, deserializer, self._throttle)
        return _StreamDecodeLayer(decoder) if rpc.request_streaming else _UnaryDecodeLayer(decoder)

    def wrap(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        layer = self.layer(rpc, handler)
        if layer is None:
            return handler
        # No request deserializer: gRPC passes the raw bytes, which this layer decodes.
        return wrap_rpc_behavior(handler, layer, request_deserializer=None)
