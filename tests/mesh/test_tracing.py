"""Traces on a real mTLS mesh server: a client span and a server span per call, for every arity,
written by the file exporter; the queue's context field and span links; log lines with ids."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from streammesh.mesh import MeshServer, TlsMaterial, create_channel
from streammesh.mesh.interceptors.tracing import ServerTracingInterceptor
from streammesh.mesh.logs import JsonFormatter
from streammesh.mesh.metrics import ServiceMetrics
from streammesh.mesh.server import standard_interceptors
from streammesh.mesh.settings import ServiceSettings
from streammesh.mesh.tracing import (
    TracingConfig,
    configure_tracing,
    context_field,
    shutdown_tracing,
    span_links,
    tracer,
    tracing_enabled,
)
from streammesh.mesh.tracing_client import tracing_interceptors
from tests.mesh.arity import SERVICE, Message, arity_server, call


@pytest.fixture
def spans_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "spans.jsonl"
    assert configure_tracing(TracingConfig(exporter="file", file=path), "arity-test")
    yield path
    shutdown_tracing()


def finished_spans(path: Path) -> list[dict[str, Any]]:
    """Every span exported so far (shutting tracing down flushes the batch)."""
    shutdown_tracing()
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
async def traced(spans_file: Path, pki_dir: Path) -> AsyncIterator[tuple[MeshServer, Any]]:
    server = arity_server(pki_dir)
    await server.start()
    channel = create_channel(
        f"127.0.0.1:{server.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="processor",
        config={"methodConfig": []},
        interceptors=tracing_interceptors(),
    )
    yield server, channel
    await channel.close()
    await server.stop(0)


def pairs(spans: list[dict[str, Any]], method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The client and the server span of `method`'s one call."""
    name = f"{SERVICE}/{method}"
    client = [s for s in spans if s["name"] == name and s["kind"] == "SpanKind.CLIENT"]
    server = [s for s in spans if s["name"] == name and s["kind"] == "SpanKind.SERVER"]
    assert len(client) == len(server) == 1, (method, client, server)
    return client[0], server[0]


async def test_every_arity_has_a_client_span_and_its_server_child(
    traced: tuple[MeshServer, Any], spans_file: Path
) -> None:
    _, channel = traced
    with tracer().start_as_current_span("caller") as caller:
        for method in ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream"):
            await call(channel, method, ["a", "b"])
        with pytest.raises(grpc.aio.AioRpcError):
            await call(channel, "NotFound")
    trace_id = format(caller.get_span_context().trace_id, "#034x")
    spans = finished_spans(spans_file)
    for method in ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream", "NotFound"):
        client, server = pairs(spans, method)
        assert client["context"]["trace_id"] == server["context"]["trace_id"] == trace_id
        assert server["parent_id"] == client["context"]["span_id"]
        assert client["parent_id"] == format(caller.get_span_context().span_id, "#018x")
        for span in (client, server):
            assert span["attributes"]["rpc.system"] == "grpc"
            assert span["attributes"]["rpc.service"] == SERVICE
            assert span["attributes"]["rpc.method"] == method
    ok_client, ok_server = pairs(spans, "StreamStream")
    assert ok_client["attributes"]["rpc.grpc.status_code"] == 0
    assert ok_server["status"]["status_code"] == "UNSET"
    nf_client, nf_server = pairs(spans, "NotFound")
    assert nf_client["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert nf_server["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # NOT_FOUND is the caller's error, not the server's (the RPC conventions).
    assert nf_client["status"]["status_code"] == "ERROR"
    assert nf_server["status"]["status_code"] == "UNSET"


async def test_a_streams_spans_end_when_the_stream_ends(
    traced: tuple[MeshServer, Any], spans_file: Path
) -> None:
    _, channel = traced
    stream = channel.unary_stream(
        f"/{SERVICE}/Endless",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=bytes,
    )
    call_ = stream(Message(kid="x"))
    for _ in range(3):
        await call_.read()
    await asyncio.sleep(0.2)
    assert not [s for s in finished_spans_peek(spans_file) if s["name"].endswith("/Endless")]
    call_.cancel()
    await asyncio.sleep(0.3)
    client, server = pairs(finished_spans(spans_file), "Endless")
    cancelled = grpc.StatusCode.CANCELLED.value[0]
    assert client["attributes"]["rpc.grpc.status_code"] == cancelled
    assert server["attributes"]["rpc.grpc.status_code"] == cancelled
    started_ns, ended_ns = server["start_time"], server["end_time"]
    assert started_ns < ended_ns


def finished_spans_peek(path: Path) -> list[dict[str, Any]]:
    """The spans exported so far, without stopping tracing (flushes the batch first)."""
    from streammesh.mesh import tracing

    assert tracing._active is not None
    tracing._active.provider.force_flush()
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_health_watch_is_traced_and_still_streams(
    traced: tuple[MeshServer, Any], spans_file: Path
) -> None:
    """The stock health Watch writes with context.write (where the contrib interceptor fails)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, channel = traced
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    first = await asyncio.wait_for(watch.read(), 5)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    await asyncio.sleep(0.3)
    spans = finished_spans(spans_file)
    assert {s["kind"] for s in spans if s["name"] == "grpc.health.v1.Health/Watch"} == {
        "SpanKind.CLIENT",
        "SpanKind.SERVER",
    }


def test_context_fields_become_span_links_once_each() -> None:
    provider = TracerProvider()
    local = provider.get_tracer("test")
    with local.start_as_current_span("publish") as publish:
        field = context_field()
    with local.start_as_current_span("other") as other:
        second = context_field()
    assert field is not None and second is not None
    assert context_field() is None  # no span, nothing to carry
    assert len(field) == 55 and field.startswith("00-")
    links = span_links([field, second.encode(), field, None, b"", "00-garbage", "not-a-context"])
    assert [link.context.span_id for link in links] == [
        publish.get_span_context().span_id,
        other.get_span_context().span_id,
    ]
    assert links[0].context.trace_id == publish.get_span_context().trace_id
    assert links[0].context.is_remote


def test_log_lines_carry_the_current_trace_and_span_ids() -> None:
    formatter = JsonFormatter("test")
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO"})
    assert "trace_id" not in json.loads(formatter.format(record))
    with TracerProvider().get_tracer("test").start_as_current_span("work") as span:
        line = json.loads(formatter.format(record))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")


def test_tracing_off_installs_nothing(pki_dir: Path) -> None:
    assert not tracing_enabled()
    assert not configure_tracing(TracingConfig(), "off")
    settings = ServiceSettings(tls_dir=pki_dir)
    chosen = standard_interceptors(settings, guard=None, metrics=ServiceMetrics("off"))
    assert not any(isinstance(i, ServerTracingInterceptor) for i in chosen)


def test_tracing_on_comes_first_in_the_server_list(spans_file: Path, pki_dir: Path) -> None:
    settings = ServiceSettings(tls_dir=pki_dir)
    chosen = standard_interceptors(settings, guard=None, metrics=ServiceMetrics("on"))
    assert isinstance(chosen[0], ServerTracingInterceptor)


def test_tracing_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="tracing_file"):
        ServiceSettings(tracing_exporter="file")
    with pytest.raises(ValueError, match="tracing_sample_ratio"):
        ServiceSettings(tracing_sample_ratio=1.5)
    config = ServiceSettings(tracing_exporter="otlp", tracing_sample_ratio=0.01).tracing()
    assert (config.exporter, config.sample_ratio) == ("otlp", 0.01)


async def test_a_call_without_context_starts_its_own_trace(
    traced: tuple[MeshServer, Any], spans_file: Path, pki_dir: Path
) -> None:
    """The server span a call made current does not outlive it: the next call, from a client
    that sends no traceparent, is a new root (grpc.aio runs each call in its own task)."""
    server, _ = traced
    plain = create_channel(
        f"127.0.0.1:{server.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="processor",
        config={"methodConfig": []},
    )
    async with plain:
        await call(plain, "UnaryUnary")
        await call(plain, "UnaryUnary")
    roots = [s for s in finished_spans(spans_file) if s["name"] == f"{SERVICE}/UnaryUnary"]
    assert [s["parent_id"] for s in roots] == [None, None]
    assert roots[0]["context"]["trace_id"] != roots[1]["context"]["trace_id"]


@pytest.mark.parametrize("exporter", ["otlp", "console"])
def test_each_exporter_is_built_and_shut_down(exporter: Any) -> None:
    from streammesh.mesh.tracing_client import default_tracing_interceptors

    assert default_tracing_interceptors() == []
    try:
        assert configure_tracing(TracingConfig(exporter=exporter, sample_ratio=0.5), "x")
        assert tracing_enabled()
        assert len(default_tracing_interceptors()) == 4
    finally:
        shutdown_tracing()
    assert not tracing_enabled()
