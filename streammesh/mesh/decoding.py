"""Request decoding inside the guarded call.

gRPC core runs a handler's request deserializer before any interceptor code sees the call, and
answers its DecodeError with UNKNOWN and an ERROR traceback: anyone could fill the log without
a token. The guard interceptor therefore registers every handler without a deserializer (gRPC
passes the raw bytes on) and decodes here, after the guard: bytes that are not a valid request
become INVALID_ARGUMENT, with one warning line, rate-limited.

Handlers must read a request stream by iterating it (as every handler here, health and
reflection do); `context.read()` would return the raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from streammesh.mesh.errors import InvalidArgument, rich_status_trailers
from streammesh.mesh.logs import LogThrottle

__all__ = ["DecodedRequests", "Deserializer", "RequestDecoder"]

Deserializer = Callable[[bytes], Any]


class RequestDecoder:
    """Decodes the requests of one method, turning DecodeError into InvalidArgument."""

    def __init__(self, method: str, deserializer: Deserializer, throttle: LogThrottle) -> None:
        self._method = method
        self._deserializer = deserializer
        self._throttle = throttle
        message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
        name = getattr(message_type, "full_name", None) or "request message"
        # The client learns what was expected, not how the parser failed.
        self._refusal = f"the request is not a valid {name} (bad protobuf, or a string not UTF-8)"

    def __call__(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self._deserializer(raw)
        except DecodeError as error:
            self._throttle.warning(
                "undecodable request to %s from %s: %s", self._method, context.peer(), error
            )
            raise InvalidArgument(self._refusal) from None


class DecodedRequests:
    """A call's request stream, decoded message by message.

    The failure is raised to whoever reads the stream. When that is not the call's own task (a
    handler may read in a background task), the reader answers the call right away and then
    cancels the call's task, so the call ends now instead of at its deadline. (Cancelling alone
    is not enough: the cancellation may land in gRPC's own code between two responses, and gRPC
    then sends no status at all.)
    """

    def __init__(
        self,
        raw: AsyncIterator[bytes],
        decode: RequestDecoder,
        context: grpc.aio.ServicerContext,
    ) -> None:
        self._raw = raw
        self._decode = decode
        self._context = context
        self._call_task = asyncio.current_task()
        self.answered_elsewhere = False
        """Set when a background reader answered the call and cancelled its task."""

    def __aiter__(self) -> DecodedRequests:
        return self

    async def __anext__(self) -> Any:
        raw = await self._raw.__anext__()
        try:
            return self._decode(raw, self._context)
        except InvalidArgument as failure:
            task = self._call_task
            if task is not None and task is not asyncio.current_task() and not task.done():
                await self._answer_elsewhere(failure, task)
            raise

    async def _answer_elsewhere(self, failure: InvalidArgument, task: asyncio.Task[Any]) -> None:
        if not self._context.done():
            self.answered_elsewhere = True
            with contextlib.suppress(grpc.aio.AbortError):
                await self._context.abort(
                    failure.code, failure.message, trailing_metadata=rich_status_trailers(failure)
                )
        task.cancel()
