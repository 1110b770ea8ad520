"""A server span per call, for every arity, as an interceptor layer.

Not opentelemetry-instrumentation-grpc's aio server interceptor: it iterates every streaming
behaviour with `async for`, so a handler that writes with `context.write` (the stock health
Watch, which health-checked round_robin clients call on every replica) fails with UNKNOWN
(opentelemetry-python-contrib#3066), and it records rpc.grpc.status_code 0 for a call that
ended with an exception. This layer takes the status the same way the metrics do (`call_code`).

The span follows the OpenTelemetry RPC conventions: name `pkg.Service/Method`, kind SERVER,
rpc.system, rpc.service, rpc.method, rpc.grpc.status_code; the parent is the W3C traceparent
of the call's metadata. A stream's span ends when the stream does.
"""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from streammesh.mesh.interceptors.base import Layer, LayerInterceptor, Rpc
from streammesh.mesh.metrics.codes import call_code
from streammesh.mesh.tracing import TRACEPARENT, extract_context, tracer

__all__ = ["SERVER_ERROR_CODES", "ServerTracingInterceptor", "rpc_attributes", "set_rpc_status"]

SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""The codes that make a server span an error (the RPC conventions): the others are the
client's doing, not the server's."""


def rpc_attributes(service: str, method: str) -> dict[str, str]:
    """The span attributes of one method (rpc.system, rpc.service, rpc.method)."""
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def set_rpc_status(span: Span, code: grpc.StatusCode, *, error: bool, message: str = "") -> None:
    """rpc.grpc.status_code, and the span's status ERROR when `error`."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if error:
        span.set_status(Status(StatusCode.ERROR, message or code.name))


class _ServerTracingLayer(Layer):
    __slots__ = ("_attributes", "_name", "_tracer")

    def __init__(self, rpc: Rpc, tracer_: trace.Tracer) -> None:
        self._name = f"{rpc.service}/{rpc.name}"
        self._attributes = rpc_attributes(rpc.service, rpc.name)
        self._tracer = tracer_

    async def enter(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, Any]:
        carrier = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if key in (TRACEPARENT, "tracestate")
        }
        span = self._tracer.start_span(
            self._name,
            context=extract_context(carrier) if carrier else None,
            kind=SpanKind.SERVER,
            attributes=self._attributes,
        )
        # Current for the rest of the call: inner layers, the handler, its client calls and
        # log lines. grpc.aio runs each call in its own task with its own copy of the context,
        # so the attachment ends with the call; it is not detached, since a stream's generator
        # may be closed from another context, where detaching fails.
        otel_context.attach(trace.set_span_in_context(span))
        return request, span

    async def leave(
        self, state: Span, context: grpc.aio.ServicerContext, error: BaseException | None
    ) -> bool:
        code = call_code(context, error)
        details = context.details() if code is not grpc.StatusCode.OK else ""
        set_rpc_status(state, code, error=code in SERVER_ERROR_CODES, message=details or "")
        if error is not None and code is grpc.StatusCode.UNKNOWN:
            state.record_exception(error)
        state.end()
        return False


class ServerTracingInterceptor(LayerInterceptor):
    """A SERVER span around every call; first in the list (see standard_interceptors)."""

    def __init__(self, tracer_: trace.Tracer | None = None) -> None:
        super().__init__()
        self._tracer = tracer_ or tracer()

    def layer(self, rpc: Rpc, handler: grpc.RpcMethodHandler) -> Layer:
        return _ServerTracingLayer(rpc, self._tracer)
