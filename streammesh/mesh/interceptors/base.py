"""The one helper every server interceptor is built on: a `Layer` of hooks around each call of
one method, and `wrap_rpc_behavior`, which applies a layer to any of the four RPC arities.

A server interceptor here only sees the method's handler, not the call (grpc.aio gives
`intercept_service` the method name alone), so each concern wraps the handler's behaviour, as
grpc/grpc's service-latency-interceptor example does. Writing that wrapper four times per
concern (unary or streaming requests, a returned response or an async generator) is where
interceptors go wrong, so it is written once, here: a concern says what happens before the call
(`enter`: refuse it, replace the request), at each response (`sent`) and after it (`leave`: with
the error or None), and `wrap_rpc_behavior` runs those hooks for every arity.

Interceptors build one layer per method, once, and reuse the wrapped handler while the server
returns the same handler for that method: a call costs a dictionary lookup, not new closures.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["Layer", "LayerInterceptor", "Rpc", "wrap_rpc_behavior"]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}
_KEEP: Any = object()


@dataclass(frozen=True, slots=True)
class Rpc:
    """One method as the interceptors see it."""

    method: str
    """The full name, `/pkg.Service/Method`."""
    service: str
    """`pkg.Service`."""
    name: str
    """`Method`."""
    request_streaming: bool
    response_streaming: bool

    @classmethod
    def of(cls, method: str, handler: grpc.RpcMethodHandler) -> Rpc:
        service, _, name = method.lstrip("/").rpartition("/")
        return cls(method, service, name, handler.request_streaming, handler.response_streaming)

    @property
    def grpc_type(self) -> str:
        """unary, client_stream, server_stream or bidi_stream (go-grpc-prometheus' names)."""
        return _GRPC_TYPES[(self.request_streaming, self.response_streaming)]


class Layer:
    """What one concern does around each call of one method. Override only the hooks needed:
    the base's are skipped, not called.

    `enter` runs before the call and returns the request to pass on (the same one, or a
    replacement) and a per-call state; raising refuses the call, and then this layer's
    `leave` does not run (the outer layers' do). `sent` runs after each response message.
    `leave` runs after the call with the error it ended with (None on success); it may raise
    a replacement, and returns True to swallow the error (the call then ends as the context
    says). Streaming calls end in `leave` too when the client goes away: with CancelledError
    or GeneratorExit, which a layer must let pass.
    """

    async def enter(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, Any]:
        return request, None

    def sent(self, state: Any) -> None:
        """One response message went out."""

    async def leave(
        self, state: Any, context: grpc.aio.ServicerContext, error: BaseException | None
    ) -> bool:
        return False


def _hook(layer: Layer, name: str) -> Any:
    """The layer's hook, or None when it keeps the base's no-op."""
    if getattr(type(layer), name) is getattr(Layer, name):
        return None
    return getattr(layer, name)


def wrap_rpc_behavior(
    handler: grpc.RpcMethodHandler,
    layer: Layer,
    *,
    request_deserializer: Callable[[bytes], Any] | None = _KEEP,
) -> grpc.RpcMethodHandler:
    """`handler` with `layer`'s hooks around its behaviour, whatever its arity.

    `request_deserializer` replaces the handler's (the decoding layer passes None so that
    gRPC hands the raw bytes on); by default it is kept.
    """
    enter: Callable[..., Awaitable[tuple[Any, Any]]] | None = _hook(layer, "enter")
    sent: Callable[[Any], None] | None = _hook(layer, "sent")
    leave: Callable[..., Awaitable[bool]] | None = _hook(layer, "leave")
    behavior: Callable[..., Any]

    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream
        generates = inspect.isasyncgenfunction(inner)

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            state = None
            if enter is not None:
                request, state = await enter(request, context)
            try:
                if generates:
                    # aclosing: when the client goes away mid-stream, the inner generator is
                    # closed now, in this task, not later by the garbage collector.
                    async with contextlib.aclosing(inner(request, context)) as responses:
                        async for response in responses:
                            if sent is not None:
                                sent(state)
                            yield response
                else:  # a coroutine that writes with context.write (the stock health Watch)
                    await inner(request, context)
            except BaseException as error:
                if leave is not None and await leave(state, context, error):
                    return
                raise
            if leave is not None:
                await leave(state, context, None)

        behavior = streaming
    else:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            state = None
            if enter is not None:
                request, state = await enter(request, context)
            try:
                response = await inner(request, context)
            except BaseException as error:
                if leave is not None and await leave(state, context, error):
                    return None
                raise
            if sent is not None:
                sent(state)
            if leave is not None:
                await leave(state, context, None)
            return response

        behavior = unary

    factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behavior,
        request_deserializer=(
            handler.request_deserializer if request_deserializer is _KEEP else request_deserializer
        ),
        response_serializer=handler.response_serializer,
    )


class LayerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A server interceptor made of one `Layer` per method: subclasses implement `layer`.

    The wrapped handler of each method is built once and kept while the server returns the same
    handler for it (keyed by method: as many entries as the server hosts methods).
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def layer(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> Layer | None:
        """The layer for `rpc`'s calls; None leaves the method alone."""
        raise NotImplementedError

    def wrap(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` wrapped in `layer(rpc)`; an override may change what is wrapped."""
        layer = self.layer(rpc, handler)
        return handler if layer is None else wrap_rpc_behavior(handler, layer)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(Rpc.of(method, handler), handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
