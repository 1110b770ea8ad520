"""A publish traced through the queue, exported over OTLP to the real receiver of
test_traces.py: the gateway's trace reaches ingest's `publish` span, whose context travels in
the stream entry; the processor's `process` span links to it (the messaging conventions for a
batch receive) and storage's spans follow the process span in the processor's trace."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from opentelemetry.proto.trace.v1 import trace_pb2

from services.processor.delivery.storage_client import StorageWriter, storage_client
from services.processor.worker import StreamWorker, WorkerConfig
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.mesh.tasks import stop_task
from tests.gateway.conftest import Stack
from tests.gateway.test_traces import (  # noqa: F401 (receiver and stack are fixtures)
    CLIENT,
    SERVER,
    Receiver,
    one,
    receiver,
    stack,
)
from tests.processor.conftest import drained, wait_for

PRODUCER = trace_pb2.Span.SPAN_KIND_PRODUCER
CONSUMER = trace_pb2.Span.SPAN_KIND_CONSUMER

WORKER = WorkerConfig(read_count=8, block_ms=50, heartbeat_ms=50, trim_interval_seconds=0)


async def publish_one(running: Stack, run: str) -> None:
    async def requests() -> AsyncIterator[gateway_pb2.PublishRequest]:
        yield gateway_pb2.PublishRequest(
            sequence=1, events=[event_pb2.Event(id=f"{run}-1", key=run, type="trace.test")]
        )

    call = running.gateway.Publish(
        requests(), metadata=running.people["producer"].bearer(), timeout=10
    )
    assert [ack.sequence async for ack in call] == [1]


async def process_queue(running: Stack) -> None:
    """Run a processor's worker (its storage client made now, with tracing on) until every
    entry is stored and acknowledged."""
    client = storage_client(f"127.0.0.1:{running.storage_port}", running.pki_dir, timeout_seconds=5)
    writer = StorageWriter(client)
    worker = StreamWorker(
        running.redis,
        running.layout,
        consumer="trace-test",
        store=writer.store,
        dead_letters=writer.record_dead_letter,
        config=WORKER,
    )
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: drained(running.redis, running.layout), what="the queue drained")
    finally:
        worker.stop()
        await asyncio.wait({task}, timeout=5)
        await stop_task(task)
        await client.close()


async def test_a_publish_links_the_processors_trace_to_the_gateways(
    stack: Stack,  # noqa: F811 (the imported fixture)
    receiver: Receiver,  # noqa: F811
) -> None:
    await publish_one(stack, f"qt-{uuid.uuid4().hex[:8]}")
    await process_queue(stack)
    spans = await receiver.collected()

    # The gateway's trace: edge -> ingest's Publish -> the publish span (a producer span).
    edge = one(spans, SERVER, "streammesh.gateway.v1.GatewayService/Publish")
    in_trace = [s for s in spans if s.trace_id == edge.trace_id]
    at_ingest = one(in_trace, SERVER, "streammesh.ingest.v1.IngestService/Publish")
    to_ingest = one(in_trace, CLIENT, "streammesh.ingest.v1.IngestService/Publish")
    assert to_ingest.parent_span_id == edge.span_id
    assert at_ingest.parent_span_id == to_ingest.span_id
    publish = one(in_trace, PRODUCER, "publish")
    assert publish.parent_span_id == at_ingest.span_id

    # The processor's trace: its process span links to the publish span's context...
    process = one(spans, CONSUMER, "process")
    assert process.trace_id != edge.trace_id
    assert not process.parent_span_id
    assert [(link.trace_id, link.span_id) for link in process.links] == [
        (publish.trace_id, publish.span_id)
    ]
    # ...and storage's spans are its children: the client's, then the server's.
    in_process = [s for s in spans if s.trace_id == process.trace_id]
    to_storage = one(in_process, CLIENT, "streammesh.storage.v1.StorageService/StoreEvents")
    at_storage = one(in_process, SERVER, "streammesh.storage.v1.StorageService/StoreEvents")
    assert to_storage.parent_span_id == process.span_id
    assert at_storage.parent_span_id == to_storage.span_id
    assert process.start_time_unix_nano <= to_storage.start_time_unix_nano
    assert to_storage.end_time_unix_nano <= process.end_time_unix_nano
