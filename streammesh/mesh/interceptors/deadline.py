"""Deadlines: every call with a single response has one, and its handler can read what is left.

A call whose client set no deadline gets the service's default (the `default_deadline_seconds`
setting), enforced here: when it passes, the handler is cancelled and the caller gets
DEADLINE_EXCEEDED. Streaming responses get no default: a subscription or a publish stream lives
as long as its caller wants (as the channels' service config has it). A deadline the client set
is gRPC's own to enforce; this layer only makes it readable.

Handlers (and what they call, in the same task or tasks it starts) read the time left with
`time_remaining()`, and pass it on downstream: `context.time_remaining()` knows only the
client's deadline.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import grpc

from streammesh.mesh.errors import DeadlineExceeded
from streammesh.mesh.interceptors.base import Layer, LayerInterceptor, Rpc

__all__ = ["DeadlineInterceptor", "time_remaining"]

# gRPC reports "no deadline" as a remaining time of centuries.
_NO_DEADLINE = 1e8

_deadline: contextvars.ContextVar[tuple[float, grpc.aio.ServicerContext] | None] = (
    contextvars.ContextVar("streammesh_call_deadline", default=None)
)
"""The current call's deadline on the event loop's clock, and the call; None when it has none."""


def time_remaining() -> float | None:
    """Seconds left before the current call's deadline (never below 0), or None when the call
    has none (a stream whose client set none) or this is not inside a call. A task that
    outlives the call it was started from (a worker started on first use, like the gateway's
    audit trail) copied the call's context but no longer works for it: once the call is done,
    its deadline no longer applies."""
    current = _deadline.get()
    if current is None:
        return None
    deadline, context = current
    if context.done():
        return None
    return max(0.0, deadline - asyncio.get_running_loop().time())


class _DeadlineLayer(Layer):
    __slots__ = ("_default", "_method")

    def __init__(self, method: str, default: float | None) -> None:
        self._method = method
        self._default = default
        """Seconds a call without a deadline gets; None: none (streaming responses)."""

    async def enter(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, Any]:
        now = asyncio.get_running_loop().time()
        remaining = context.time_remaining()
        scope = None
        if remaining is not None and remaining < _NO_DEADLINE:
            _deadline.set((now + remaining, context))
        elif self._default is not None:
            scope = asyncio.timeout_at(now + self._default)
            await scope.__aenter__()
            _deadline.set((now + self._default, context))
        # Not reset afterwards: gRPC runs each call in a task (and so a context) of its own.
        return request, scope

    async def leave(
        self,
        state: asyncio.Timeout | None,
        context: grpc.aio.ServicerContext,
        error: BaseException | None,
    ) -> bool:
        if state is None:
            return False
        try:
            await state.__aexit__(
                None if error is None else type(error),
                error,
                None if error is None else error.__traceback__,
            )
        except TimeoutError:
            raise DeadlineExceeded(
                f"{self._method} did not finish within {self._default:g}s, the service's "
                "default deadline for a call that sets none"
            ) from None
        return False


class DeadlineInterceptor(LayerInterceptor):
    """Gives calls with one response and no deadline `default_seconds` (0 or None: no default),
    and makes every call's deadline readable with `time_remaining()`. It stands inside the
    error layer, which answers DEADLINE_EXCEEDED."""

    def __init__(self, default_seconds: float | None) -> None:
        super().__init__()
        self._default = default_seconds or None

    def layer(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> Layer:
        default = None if rpc.response_streaming else self._default
        return _DeadlineLayer(rpc.method, default)
