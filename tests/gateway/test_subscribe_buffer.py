"""A subscriber that stops reading, through the real gateway: storage cuts its subscription at
its buffer (RESOURCE_EXHAUSTED), the gateway relays that status and its message unchanged, and
resuming through the gateway from the last resume token received delivers the rest, none twice."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.api.storage.v1 import storage_pb2_grpc as storage_grpc
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.gateway.conftest import Stack
from tests.gateway.test_subscribe import collect

pytestmark = pytest.mark.timeout(120)

STORAGE_SETTINGS = {"subscribe_buffer_items": 300}

_PAD = b'{"pad": "' + b"x" * 1000 + b'"}'


async def test_a_stalled_subscriber_is_cut_with_resource_exhausted_and_resumes(
    stack: Stack,
) -> None:
    assert stack.storage_server is not None
    registry = stack.storage_server.metrics.registry
    key = f"stalled-{uuid.uuid4().hex[:8]}"
    analyst = stack.people["analyst"].bearer()
    request = gateway_pb2.SubscribeEventsRequest(filter=event_pb2.EventFilter(keys=[key]))
    call = stack.gateway.SubscribeEvents(request, metadata=analyst)
    assert (await call.read()).current
    channel = create_channel(
        f"127.0.0.1:{stack.storage_port}",
        TlsMaterial.load(stack.pki_dir, "processor"),
        server_name="storage",
        config=service_config("streammesh.storage.v1.StorageService", health_checked=False),
    )
    written: list[str] = []
    try:
        processor = storage_grpc.StorageServiceStub(channel)
        for n in range(80):  # the client reads nothing: both hops' windows fill, then the buffer
            batch = event_pb2.QueuedBatch(partition=0)
            for i in range(500):
                queued = batch.events.add(producer="p")
                queued.event.id, queued.event.key, queued.event.type = f"{key}-{n}-{i}", key, "t"
                queued.event.payload = _PAD
                queued.ingest_time.GetCurrentTime()
                written.append(queued.event.id)
            await processor.StoreEvents(storage_pb2.StoreEventsRequest(batch=batch), timeout=30)
            if registry.get_sample_value("streammesh_storage_subscriptions_cut_total"):
                break
            await asyncio.sleep(0.05)
    finally:
        await channel.close()
    assert registry.get_sample_value("streammesh_storage_subscriptions_cut_total") == 1

    received: list[str] = []
    token = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(30):
            while True:  # what was in flight on both hops, then the status
                message = await call.read()
                assert isinstance(message, gateway_pb2.SubscribeEventsResponse)
                received += [stored.event.id for stored in message.events]
                token = message.resume_token
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = caught.value.details() or ""
    assert "fell behind by more than 300 items" in details and "resume_token" in details
    resumed = stack.gateway.SubscribeEvents(
        gateway_pb2.SubscribeEventsRequest(
            filter=event_pb2.EventFilter(keys=[key]), resume_token=token
        ),
        metadata=analyst,
    )
    rest, _ = await collect(resumed, lambda ids, current: current)
    resumed.cancel()
    received += rest
    assert len(received) == len(set(received))
    assert received == written
