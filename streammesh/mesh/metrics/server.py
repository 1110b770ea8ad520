"""gRPC server metrics (streammesh.mesh.metrics.families) as an interceptor layer.

Responses a handler writes with `context.write` instead of yielding (only the stock health Watch
does) are not counted as sent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from streammesh.mesh.interceptors.base import Layer, LayerInterceptor, Rpc
from streammesh.mesh.metrics.codes import call_code
from streammesh.mesh.metrics.families import GrpcMetrics, MethodMetrics

__all__ = ["ServerMetricsInterceptor"]


class _CountedRequests:
    """A request stream that counts each message it hands on."""

    __slots__ = ("_m", "_raw")

    def __init__(self, raw: AsyncIterator[Any], m: MethodMetrics) -> None:
        self._raw = raw
        self._m = m

    def __aiter__(self) -> _CountedRequests:
        return self

    async def __anext__(self) -> Any:
        message = await self._raw.__anext__()
        self._m.received += 1
        return message


class _ServerMetricsLayer(Layer):
    __slots__ = ("_m", "_streaming")

    def __init__(self, method_metrics: MethodMetrics, request_streaming: bool) -> None:
        self._m = method_metrics
        self._streaming = request_streaming

    async def enter(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, Any]:
        m = self._m
        m.started += 1
        if self._streaming:
            request = _CountedRequests(request, m)
        else:
            m.received += 1
        return request, time.perf_counter()

    def sent(self, state: float) -> None:
        self._m.sent += 1

    async def leave(
        self, state: float, context: grpc.aio.ServicerContext, error: BaseException | None
    ) -> bool:
        self._m.done(call_code(context, error), time.perf_counter() - state)
        return False


class ServerMetricsInterceptor(LayerInterceptor):
    """Counts every call in `metrics`; first in the list, so that it sees the status the error
    layer gave (guard refusals included) and times the whole call."""

    def __init__(self, metrics: GrpcMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def layer(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> Layer:
        return _ServerMetricsLayer(self._metrics.method(rpc), rpc.request_streaming)
