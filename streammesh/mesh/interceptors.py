"""The server interceptor every service runs: a guard before each call, the request decoded
after it, and one place where exceptions become statuses.

grpc.aio interceptors only see the method name, not the call's context, so the guard is applied by
wrapping the handler's behavior. Handlers may be coroutines or async generators (and the stock
health servicer's Watch is a coroutine that writes), so all four arities are covered. The
wrapped handler takes raw bytes and decodes them itself (see streammesh.mesh.decoding): the
guard refuses a caller before its bytes are parsed, and bad bytes become INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from streammesh.mesh.decoding import DecodedRequests, RequestDecoder
from streammesh.mesh.errors import StreamMeshError, rich_status_trailers
from streammesh.mesh.logs import LogThrottle

__all__ = ["Guard", "GuardInterceptor", "abort_with"]

log = logging.getLogger(__name__)

Guard = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]
"""Runs before a call with its full method name; raises StreamMeshError to refuse it."""

_PASSTHROUGH = (grpc.aio.AbortError, GeneratorExit)

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


async def abort_with(context: grpc.aio.ServicerContext, error: StreamMeshError) -> None:
    await context.abort(error.code, error.message, trailing_metadata=rich_status_trailers(error))


async def _fail(
    context: grpc.aio.ServicerContext, method: str, error: BaseException, throttle: LogThrottle
) -> None:
    if isinstance(error, StreamMeshError):
        await abort_with(context, error)
    if isinstance(error, NotImplementedError):
        # What a generated servicer base class raises for a method nobody implemented (the
        # stock health servicer has no List): the caller's question, not our failure.
        throttle.warning("unimplemented method %s called by %s", method, context.peer())
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    log.exception("unhandled error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Applies `guard` to every call, then decodes the request, and maps errors from the guard,
    the decoding or the handler to statuses.

    The wrapped handler of each method is built once and reused while the server returns the
    same handler for it, so a call costs a dictionary lookup, not a new set of closures.
    """

    def __init__(self, guard: Guard | None = None, *, throttle: LogThrottle | None = None) -> None:
        self._guard = guard
        self._throttle = throttle or LogThrottle(log)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

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
        wrapped = self._wrap(method, handler)
        # Keyed by method: as many entries as the server hosts methods (unknown ones are None).
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        guard = self._guard
        throttle = self._throttle
        deserializer = handler.request_deserializer
        decoder = RequestDecoder(method, deserializer, throttle) if deserializer else None
        request_streaming: bool = handler.request_streaming

        async def admit(
            request: Any, context: grpc.aio.ServicerContext
        ) -> tuple[Any, DecodedRequests | None]:
            """The guard first: a caller it refuses never has its bytes parsed."""
            if guard is not None:
                await guard(method, context)
            if decoder is None:
                return request, None
            if request_streaming:
                requests = DecodedRequests(request, decoder, context)
                return requests, requests
            return decoder(request, context), None

        async def settle(
            error: BaseException,
            context: grpc.aio.ServicerContext,
            requests: DecodedRequests | None,
        ) -> None:
            """Answer the error with its status (the one place errors become statuses)."""
            if isinstance(error, asyncio.CancelledError):
                if requests is None or not requests.answered_elsewhere:
                    raise error
                # A background reader of the request stream found a message that did not
                # decode, answered the call and cancelled this task: nothing is left to say
                # (gRPC raises the recorded abort when this returns).
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                return
            await _fail(context, method, error, throttle)

        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                requests = None
                try:
                    request, requests = await admit(request, context)
                    if inspect.isasyncgenfunction(inner):
                        async for response in inner(request, context):
                            yield response
                    else:
                        await inner(request, context)
                except _PASSTHROUGH:
                    raise
                except (Exception, asyncio.CancelledError) as error:
                    await settle(error, context, requests)

            behavior: Callable[..., Any] = streaming
        else:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                requests = None
                try:
                    request, requests = await admit(request, context)
                    return await inner(request, context)
                except _PASSTHROUGH:
                    raise
                except (Exception, asyncio.CancelledError) as error:
                    await settle(error, context, requests)

            behavior = unary

        factory = _FACTORIES[(request_streaming, handler.response_streaming)]
        # No request deserializer: gRPC hands the raw bytes to `behavior`, which decodes them
        # after the guard.
        return factory(
            behavior,
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
