"""Client spans for grpc.aio channels: a CLIENT span per call, whose W3C traceparent goes to the
server in the call's metadata. MeshClient installs these when tracing is on:

    channel = grpc.aio.secure_channel(target, credentials, interceptors=tracing_interceptors())

A unary call's span ends when its status is known; a response stream's when the call is done
(read to its end, failed, or cancelled). Our own rather
than opentelemetry-instrumentation-grpc's client interceptors, so that client and server spans
share one set of attributes and statuses (streammesh.mesh.interceptors.tracing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from streammesh.mesh.interceptors.tracing import rpc_attributes, set_rpc_status
from streammesh.mesh.tracing import inject_metadata, tracer, tracing_enabled

__all__ = [
    "StreamStreamTracingInterceptor",
    "StreamUnaryTracingInterceptor",
    "UnaryStreamTracingInterceptor",
    "UnaryUnaryTracingInterceptor",
    "default_tracing_interceptors",
    "tracing_interceptors",
]

Continuation = Callable[..., Any]


def _end(span: Span, code: grpc.StatusCode, details: str | None = None) -> None:
    # Any status but OK is an error on the client's side (the RPC conventions).
    set_rpc_status(span, code, error=code is not grpc.StatusCode.OK, message=details or "")
    span.end()


async def _unary_response(span: Span, call: Any) -> Any:
    """Wait for the status of a call with one response, end its span and return the call done
    (a task per call, as a done callback needs, costs about 10 µs more)."""
    try:
        code: grpc.StatusCode = await call.code()
    except asyncio.CancelledError:
        call.cancel()  # the caller gave up: the call goes with it
        _end(span, grpc.StatusCode.CANCELLED)
        raise
    _end(span, code, await call.details() if code is not grpc.StatusCode.OK else None)
    return call


_ENDING: set[asyncio.Task[None]] = set()
"""Tasks ending stream spans, kept referenced until they ran."""


async def _end_from(span: Span, call: Any) -> None:
    code: grpc.StatusCode = await call.code()  # the call is done: this returns at once
    _end(span, code, await call.details() if code is not grpc.StatusCode.OK else None)


def _end_when_done(span: Span, call: Any) -> Any:
    """End `span` when the stream call is done, however it ends: read to its end, failed, or
    cancelled by a caller that stopped reading (a wrapping generator would not learn of that).
    The call itself is returned, with its whole API (read, cancel, metadata)."""

    def done(finished: Any) -> None:
        task = asyncio.get_running_loop().create_task(_end_from(span, finished))
        _ENDING.add(task)
        task.add_done_callback(_ENDING.discard)

    call.add_done_callback(done)
    return call


class _TracingInterceptor:
    """What the four arities share: start the span, send its context, end it with the call."""

    def __init__(self, tracer_: trace.Tracer) -> None:
        self._tracer = tracer_

    async def _intercept(
        self, continuation: Continuation, details: Any, request: Any, *, responses: bool
    ) -> Any:
        method = details.method
        # grpc.aio hands the method over as bytes (grpc/grpc#31092); accept both.
        name = (method.decode() if isinstance(method, bytes) else str(method)).lstrip("/")
        service, _, short = name.rpartition("/")
        span = self._tracer.start_span(
            name, kind=SpanKind.CLIENT, attributes=rpc_attributes(service, short)
        )
        metadata: list[tuple[str, str]] = list(details.metadata or ())
        inject_metadata(metadata, trace.set_span_in_context(span))
        details = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata),
            details.credentials,
            details.wait_for_ready,
        )
        try:
            call = await continuation(details, request)
        except grpc.aio.AioRpcError as error:
            _end(span, error.code(), error.details())
            raise
        except asyncio.CancelledError:
            _end(span, grpc.StatusCode.CANCELLED)
            raise
        if responses:
            return _end_when_done(span, call)
        return await _unary_response(span, call)


class UnaryUnaryTracingInterceptor(_TracingInterceptor, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Traces unary calls."""

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: Any, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request, responses=False)


class UnaryStreamTracingInterceptor(_TracingInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Traces calls with a response stream."""

    async def intercept_unary_stream(
        self, continuation: Continuation, client_call_details: Any, request: Any
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request, responses=True)


class StreamUnaryTracingInterceptor(_TracingInterceptor, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Traces calls with a request stream."""

    async def intercept_stream_unary(
        self, continuation: Continuation, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._intercept(
            continuation, client_call_details, request_iterator, responses=False
        )


class StreamStreamTracingInterceptor(_TracingInterceptor, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Traces bidirectional streaming calls."""

    async def intercept_stream_stream(
        self, continuation: Continuation, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._intercept(
            continuation, client_call_details, request_iterator, responses=True
        )


def tracing_interceptors(tracer_: trace.Tracer | None = None) -> list[grpc.aio.ClientInterceptor]:
    """The four interceptors (one per arity: grpc.aio files an interceptor under the first
    arity it implements only) that trace a channel's calls with `tracer_` (default: this
    process's, streammesh.mesh.tracing.tracer)."""
    chosen = tracer_ or tracer()
    return [
        UnaryUnaryTracingInterceptor(chosen),
        UnaryStreamTracingInterceptor(chosen),
        StreamUnaryTracingInterceptor(chosen),
        StreamStreamTracingInterceptor(chosen),
    ]


def default_tracing_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """`tracing_interceptors()` while tracing is on, else none (nothing to pay per call): what a
    channel puts first in its interceptor list (MeshClient does; so should any other channel a
    service opens to the mesh, e.g. `create_channel(..., interceptors=default_tracing_interceptors())`)."""
    return tracing_interceptors() if tracing_enabled() else []
