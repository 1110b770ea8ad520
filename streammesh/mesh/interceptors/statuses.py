"""The one place where exceptions become statuses: a StreamMeshError its own code, details and
rich trailers; NotImplementedError UNIMPLEMENTED; anything else INTERNAL, logged with its
traceback."""

from __future__ import annotations

import asyncio
import logging

import grpc

from streammesh.mesh.errors import StreamMeshError, rich_status_trailers
from streammesh.mesh.interceptors.base import Layer, LayerInterceptor, Rpc
from streammesh.mesh.logs import LogThrottle

__all__ = ["ErrorInterceptor", "abort_with"]

log = logging.getLogger("streammesh.mesh.interceptors")

# Not errors to map: an answer already given (abort), the client gone (cancel, generator close).
_PASSTHROUGH = (grpc.aio.AbortError, GeneratorExit, asyncio.CancelledError)


async def abort_with(context: grpc.aio.ServicerContext, error: StreamMeshError) -> None:
    """End the call with `error`'s code, message and google.rpc.Status trailers."""
    await context.abort(error.code, error.message, trailing_metadata=rich_status_trailers(error))


class _ErrorLayer(Layer):
    __slots__ = ("_method", "_throttle")

    def __init__(self, method: str, throttle: LogThrottle) -> None:
        self._method = method
        self._throttle = throttle

    async def leave(
        self, state: object, context: grpc.aio.ServicerContext, error: BaseException | None
    ) -> bool:
        if error is None or isinstance(error, _PASSTHROUGH):
            return False
        if isinstance(error, StreamMeshError):
            await abort_with(context, error)
        if isinstance(error, NotImplementedError):
            # What a generated servicer base class raises for a method nobody implemented (the
            # stock health servicer has no List): the caller's question, not our failure.
            self._throttle.warning(
                "unimplemented method %s called by %s", self._method, context.peer()
            )
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self._method} is not implemented")
        log.exception("unhandled error in %s", self._method, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
        return False  # not reached: abort raises


class ErrorInterceptor(LayerInterceptor):
    """Maps what the layers inside it (guard, deadline, decoding) and the handler raise to
    statuses; it stands outside them, and inside the metrics layer, which counts the codes."""

    def __init__(self, *, throttle: LogThrottle | None = None) -> None:
        super().__init__()
        self._throttle = throttle or LogThrottle(log)

    def layer(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> Layer:
        return _ErrorLayer(rpc.method, self._throttle)
