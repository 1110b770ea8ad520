"""The query API through the gateway: a filter string, pages whose token only the principal it
was issued to can replay, counts and aggregates, with real tokens from auth over mTLS."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.gateway.conftest import Stack


@pytest.fixture(scope="module")
async def stored(stack: Stack) -> AsyncIterator[str]:
    """Five events of a key of this module's own, stored as the processor stores them."""
    channel = create_channel(
        f"127.0.0.1:{stack.storage_port}",
        TlsMaterial.load(stack.pki_dir, "processor"),
        server_name="storage",
        config=service_config("streammesh.storage.v1.StorageService", health_checked=False),
    )
    key = f"query-{uuid.uuid4().hex[:8]}"
    batch = event_pb2.QueuedBatch(partition=0)
    for amount in (5, 15, 25, 35, 45):
        queued = batch.events.add(producer="p")
        queued.event.id, queued.event.key, queued.event.type = f"{key}-{amount}", key, "order"
        queued.event.payload = f'{{"amount": {amount}}}'.encode()
        queued.ingest_time.GetCurrentTime()
    try:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        await stub.StoreEvents(storage_pb2.StoreEventsRequest(batch=batch), timeout=10)
        yield key
    finally:
        await channel.close()


async def test_pages_of_a_filter_and_their_token_belong_to_the_caller(
    stack: Stack, stored: str
) -> None:
    analyst, other = stack.people["analyst"], stack.people["producer+analyst"]
    request = gateway_pb2.QueryEventsRequest(
        filter=event_pb2.EventFilter(keys=[stored]),
        filter_expression="payload.amount > 10",
        page_size=2,
    )
    first = await stack.gateway.QueryEvents(request, metadata=analyst.bearer(), timeout=10)
    assert [s.event.id for s in first.events] == [f"{stored}-15", f"{stored}-25"]
    request.page_token = first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.QueryEvents(request, metadata=other.bearer(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (caught.value.details() or "")
    second = await stack.gateway.QueryEvents(request, metadata=analyst.bearer(), timeout=10)
    assert [s.event.id for s in second.events] == [f"{stored}-35", f"{stored}-45"]
    assert second.next_page_token == ""
    request.filter_expression = "payload.amount > 20"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.QueryEvents(request, metadata=analyst.bearer(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_counts_and_aggregates_through_the_gateway(stack: Stack, stored: str) -> None:
    analyst = stack.people["analyst"].bearer()
    only = event_pb2.EventFilter(keys=[stored])
    count = await stack.gateway.CountEvents(
        gateway_pb2.CountEventsRequest(filter=only, filter_expression="payload.amount >= 25"),
        metadata=analyst,
        timeout=10,
    )
    assert count.count == 3
    reply = await stack.gateway.AggregateEvents(
        gateway_pb2.AggregateEventsRequest(
            filter=only, group_by=event_pb2.AGGREGATE_GROUP_BY_KEY, field="payload.amount"
        ),
        metadata=analyst,
        timeout=10,
    )
    (group,) = reply.groups
    assert (group.group, group.count, group.sum, group.min, group.max, group.avg) == (
        stored,
        5,
        125.0,
        5.0,
        45.0,
        25.0,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.AggregateEvents(
            gateway_pb2.AggregateEventsRequest(filter_expression="payload.amount >"),
            metadata=analyst,
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "column 17" in (caught.value.details() or "")
