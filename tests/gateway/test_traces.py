"""One trace across services, exported over OTLP gRPC to a real receiver: a collector
TraceService server in this test (built from opentelemetry-proto), with the whole stack of
tests/gateway/conftest.py tracing to it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.mesh.tracing import (
    TracingConfig,
    configure_tracing,
    flush_tracing,
    shutdown_tracing,
)
from tests.gateway.conftest import Stack

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps every span it is sent, with its service.name."""

    spans: list[tuple[str, trace_pb2.Span]] = field(default_factory=list)

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            names = [
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            ]
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((names[0], span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def collected(self) -> list[trace_pb2.Span]:
        """The spans received, once every buffered one was exported (the exporter blocks: it
        runs in a thread so that this loop can serve its Export)."""
        assert await asyncio.to_thread(flush_tracing, 10)
        return [span for _, span in self.spans]


def attributes(span: trace_pb2.Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out


def one(spans: list[trace_pb2.Span], kind: int, name: str) -> trace_pb2.Span:
    found = [s for s in spans if s.kind == kind and s.name == name]
    assert len(found) == 1, (kind, name, sorted({s.name for s in spans}))
    return found[0]


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    servicer = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    configure_tracing(
        TracingConfig(exporter="otlp", endpoint=f"http://127.0.0.1:{port}"), "gateway-stack"
    )
    yield servicer
    await asyncio.to_thread(shutdown_tracing)
    await server.stop(0)


@pytest.fixture(scope="module")
async def stack(receiver: Receiver, stack: Stack) -> Stack:
    """The module's stack, built after tracing was turned on (its servers and mesh clients
    install the tracing layer and interceptors when they are made)."""
    return stack


async def test_a_query_is_one_trace_from_the_gateway_to_storage(
    stack: Stack, receiver: Receiver
) -> None:
    analyst = stack.people["analyst"]
    await stack.gateway.QueryEvents(
        gateway_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(keys=["none"]), page_size=5),
        metadata=analyst.bearer(),
        timeout=10,
    )
    spans = await receiver.collected()
    edge = one(spans, SERVER, "streammesh.gateway.v1.GatewayService/QueryEvents")
    assert not edge.parent_span_id  # the test's own client sends no context
    in_trace = [s for s in spans if s.trace_id == edge.trace_id]
    to_storage = one(in_trace, CLIENT, "streammesh.storage.v1.StorageService/QueryEvents")
    at_storage = one(in_trace, SERVER, "streammesh.storage.v1.StorageService/QueryEvents")
    assert to_storage.parent_span_id == edge.span_id
    assert at_storage.parent_span_id == to_storage.span_id
    assert edge.start_time_unix_nano <= to_storage.start_time_unix_nano
    assert at_storage.end_time_unix_nano <= to_storage.end_time_unix_nano <= edge.end_time_unix_nano
    assert attributes(at_storage) == {
        "rpc.system": "grpc",
        "rpc.service": "streammesh.storage.v1.StorageService",
        "rpc.method": "QueryEvents",
        "rpc.grpc.status_code": 0,
    }
    assert attributes(edge)["rpc.grpc.status_code"] == 0


async def test_a_publish_streams_spans_end_when_the_stream_ends(
    stack: Stack, receiver: Receiver
) -> None:
    producer = stack.people["producer"]
    run = f"tr-{uuid.uuid4().hex[:8]}"

    async def requests() -> AsyncIterator[gateway_pb2.PublishRequest]:
        for sequence in (1, 2):
            event = event_pb2.Event(id=f"{run}-{sequence}", key=run, type="trace.test")
            yield gateway_pb2.PublishRequest(sequence=sequence, events=[event])

    call = stack.gateway.Publish(requests(), metadata=producer.bearer(), timeout=10)
    acks = [reply async for reply in call]
    assert [a.sequence for a in acks] == [1, 2]
    spans = await receiver.collected()
    edge = one(spans, SERVER, "streammesh.gateway.v1.GatewayService/Publish")
    below = [s for s in spans if s.trace_id == edge.trace_id and s is not edge]
    clients = [s for s in below if s.kind == CLIENT and s.parent_span_id == edge.span_id]
    assert clients, sorted(s.name for s in below)
    for client in clients:
        servers = [s for s in below if s.kind == SERVER and s.parent_span_id == client.span_id]
        assert [s.name for s in servers] == [client.name]
        assert servers[0].end_time_unix_nano <= client.end_time_unix_nano
    # The edge's span lasted the whole stream, and ended with its status.
    assert edge.end_time_unix_nano >= max(s.end_time_unix_nano for s in clients)
    assert attributes(edge)["rpc.grpc.status_code"] == 0
