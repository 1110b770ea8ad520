"""gRPC client metrics (grpc_client_*, streammesh.mesh.metrics.families) as grpc.aio client
interceptors, for any channel's interceptor list:

    channel = grpc.aio.secure_channel(target, credentials, interceptors=client_interceptors(m))

A unary response is counted when its status is known, within the interceptor (so the call
returned is already done, with its metadata and trailers intact); a response stream when the
caller has read it to its end or its error, as go-grpc-prometheus counts one. Client-side
metrics live in the same per-service registry as the server's (`ServiceMetrics.grpc_client`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from streammesh.mesh.interceptors.base import Rpc
from streammesh.mesh.metrics.families import GrpcMetrics, MethodMetrics

__all__ = [
    "StreamStreamMetricsInterceptor",
    "StreamUnaryMetricsInterceptor",
    "UnaryStreamMetricsInterceptor",
    "UnaryUnaryMetricsInterceptor",
    "client_interceptors",
]

Continuation = Callable[..., Any]


class _ClientMetrics:
    """The label children per method, shared by the four interceptors of one channel."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        self._metrics = metrics
        self._methods: dict[tuple[str, bool, bool], MethodMetrics] = {}

    def of(
        self, details: grpc.aio.ClientCallDetails, requests: bool, responses: bool
    ) -> MethodMetrics:
        method = details.method
        # grpc.aio hands the method over as bytes (grpc/grpc#31092); accept both.
        name = method.decode() if isinstance(method, bytes) else str(method)
        key = (name, requests, responses)
        found = self._methods.get(key)
        if found is None:
            service, _, short = name.lstrip("/").rpartition("/")
            found = self._metrics.method(Rpc(name, service, short, requests, responses))
            self._methods[key] = found
        return found


def _done(m: MethodMetrics, code: grpc.StatusCode, started: float) -> None:
    m.done(code, time.perf_counter() - started)


async def _unary_response(m: MethodMetrics, started: float, call: Any) -> Any:
    try:
        code: grpc.StatusCode = await call.code()
    except asyncio.CancelledError:
        # The caller gave up: the call is cancelled with it, not left running.
        call.cancel()
        _done(m, grpc.StatusCode.CANCELLED, started)
        raise
    if code is grpc.StatusCode.OK:
        m.received += 1
    _done(m, code, started)
    return call


async def _streamed_responses(m: MethodMetrics, started: float, call: Any) -> AsyncIterator[Any]:
    code: grpc.StatusCode | None = None
    try:
        async for response in call:
            m.received += 1
            yield response
        code = await call.code()
    except grpc.aio.AioRpcError as error:
        code = error.code()
        raise
    except (asyncio.CancelledError, GeneratorExit):
        code = grpc.StatusCode.CANCELLED
        raise
    finally:
        if code is not None:
            _done(m, code, started)


def _counted(requests: Any, m: MethodMetrics) -> Any:
    """The request stream, counting each message as the channel takes it."""
    if isinstance(requests, AsyncIterable):
        return _counted_async(requests, m)
    return _counted_sync(requests, m)


async def _counted_async(requests: AsyncIterable[Any], m: MethodMetrics) -> AsyncIterator[Any]:
    async for request in requests:
        m.sent += 1
        yield request


def _counted_sync(requests: Iterable[Any], m: MethodMetrics) -> Iterable[Any]:
    for request in requests:
        m.sent += 1
        yield request


async def _failed_to_start(m: MethodMetrics, started: float, start: Any) -> Any:
    """Await the continuation; a call that fails before it exists is counted too."""
    try:
        return await start
    except grpc.aio.AioRpcError as error:
        _done(m, error.code(), started)
        raise
    except asyncio.CancelledError:
        _done(m, grpc.StatusCode.CANCELLED, started)
        raise


class _MetricsInterceptor:
    """What the four arities share: count the start and the messages, then the end."""

    def __init__(self, metrics: _ClientMetrics) -> None:
        self._metrics = metrics

    async def _intercept(
        self,
        continuation: Continuation,
        details: Any,
        request: Any,
        *,
        requests: bool,
        responses: bool,
    ) -> Any:
        m = self._metrics.of(details, requests, responses)
        started = time.perf_counter()
        m.started += 1
        if requests:
            request = _counted(request, m)
        else:
            m.sent += 1
        call = await _failed_to_start(m, started, continuation(details, request))
        if responses:
            return _streamed_responses(m, started, call)
        return await _unary_response(m, started, call)


class UnaryUnaryMetricsInterceptor(_MetricsInterceptor, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts unary calls."""

    async def intercept_unary_unary(
        self, continuation: Continuation, client_call_details: Any, request: Any
    ) -> Any:
        return await self._intercept(
            continuation, client_call_details, request, requests=False, responses=False
        )


class UnaryStreamMetricsInterceptor(_MetricsInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Counts calls with a response stream."""

    async def intercept_unary_stream(
        self, continuation: Continuation, client_call_details: Any, request: Any
    ) -> Any:
        return await self._intercept(
            continuation, client_call_details, request, requests=False, responses=True
        )


class StreamUnaryMetricsInterceptor(_MetricsInterceptor, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    """Counts calls with a request stream."""

    async def intercept_stream_unary(
        self, continuation: Continuation, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._intercept(
            continuation, client_call_details, request_iterator, requests=True, responses=False
        )


class StreamStreamMetricsInterceptor(_MetricsInterceptor, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Counts bidirectional streaming calls."""

    async def intercept_stream_stream(
        self, continuation: Continuation, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await self._intercept(
            continuation, client_call_details, request_iterator, requests=True, responses=True
        )


def client_interceptors(metrics: GrpcMetrics) -> list[grpc.aio.ClientInterceptor]:
    """The four interceptors (one per arity: grpc.aio files an interceptor under the first
    arity it implements only) that count a channel's calls in `metrics` (a "client" side
    GrpcMetrics, such as `ServiceMetrics.grpc_client`)."""
    shared = _ClientMetrics(metrics)
    return [
        UnaryUnaryMetricsInterceptor(shared),
        UnaryStreamMetricsInterceptor(shared),
        StreamUnaryMetricsInterceptor(shared),
        StreamStreamMetricsInterceptor(shared),
    ]
