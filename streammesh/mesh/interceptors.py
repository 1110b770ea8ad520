"""The server interceptor every service runs: a guard before each call, and one place where
exceptions become statuses.

grpc.aio interceptors only see the method name, not the call's context, so the guard is applied by
wrapping the handler's behavior. Handlers may be coroutines or async generators (and the stock
health servicer's Watch is a coroutine that writes), so all four arities are covered.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from streammesh.mesh.errors import StreamMeshError, rich_status_trailers

__all__ = ["Guard", "GuardInterceptor", "abort_with"]

log = logging.getLogger(__name__)

Guard = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]
"""Runs before a call with its full method name; raises StreamMeshError to refuse it."""

_PASSTHROUGH = (grpc.aio.AbortError, GeneratorExit)


async def abort_with(context: grpc.aio.ServicerContext, error: StreamMeshError) -> None:
    await context.abort(error.code, error.message, trailing_metadata=rich_status_trailers(error))


async def _fail(context: grpc.aio.ServicerContext, method: str, error: BaseException) -> None:
    if isinstance(error, StreamMeshError):
        await abort_with(context, error)
    log.exception("unhandled error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Applies `guard` to every call and maps errors from the guard or the handler to statuses."""

    def __init__(self, guard: Guard | None = None) -> None:
        self._guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        guard = self._guard

        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            async def streaming(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    if guard is not None:
                        await guard(method, context)
                    if inspect.isasyncgenfunction(inner):
                        async for response in inner(request, context):
                            yield response
                    else:
                        await inner(request, context)
                except _PASSTHROUGH:
                    raise
                except Exception as error:  # the one place errors become statuses
                    await _fail(context, method, error)

            behavior: Callable[..., Any] = streaming
        else:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if guard is not None:
                        await guard(method, context)
                    return await inner(request, context)
                except _PASSTHROUGH:
                    raise
                except Exception as error:  # the one place errors become statuses
                    await _fail(context, method, error)

            behavior = unary

        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return factory(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
