"""The shared live feeds behind SubscribeEvents, over real mTLS and Postgres: a subscriber that
stops reading (gRPC flow control) while events flow is held to its buffer (the replica's buffer
gauges never pass the limit), cut RESOURCE_EXHAUSTED naming the resume token, and resuming from
the last token it received delivers everything after it, none twice; a write on another replica
reaches a subscriber through NOTIFY (long before the fallback poll); subscribers with a filter
expression read their spans themselves and get exactly their matches."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh import MeshServer
from tests.storage.conftest import Connect, StartServer, Stub, queued
from tests.storage.test_subscriptions import read_until, store, subscribe

_PAD = b'{"pad": "' + b"x" * 1000 + b'"}'


def _gauge(server: MeshServer, name: str) -> float:
    return server.metrics.registry.get_sample_value(name) or 0.0


async def test_a_subscriber_that_stops_reading_is_cut_at_its_buffer_and_resumes(
    start_server: StartServer, engine: AsyncEngine, connect: Connect
) -> None:
    limit = 1000
    server = await start_server(engine, subscribe_buffer_items=limit)
    stub = connect(server.port, "processor")
    reader = connect(server.port, "gateway")
    call = subscribe(reader, start_at_end=True)
    await read_until(call, lambda ids, current: current)
    written: list[str] = []
    peak = 0.0

    async def watch_buffer() -> None:
        nonlocal peak
        while True:
            peak = max(peak, _gauge(server, "streammesh_storage_subscription_buffered_items"))
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch_buffer())
    try:
        # The reader reads nothing now: transport windows fill, then its buffer. Bounded: at
        # most 60 batches of 500 events of 1 kB.
        for batch in range(60):
            ids = [f"s{batch}-{n}" for n in range(500)]
            events = [queued("big", event_id=i, payload=_PAD) for i in ids]
            request = event_pb2.QueuedBatch(events=events, partition=0, tenant="acme")
            await stub.StoreEvents(storage_pb2.StoreEventsRequest(batch=request), timeout=30)
            written += ids
            if _gauge(server, "streammesh_storage_subscriptions_cut_total"):
                break
            await asyncio.sleep(0.05)
        assert _gauge(server, "streammesh_storage_subscriptions_cut_total") == 1
        assert 0 < peak <= limit
        assert _gauge(server, "streammesh_storage_subscription_buffered_items") == 0
        assert _gauge(server, "streammesh_storage_subscription_buffered_bytes") == 0
    finally:
        watcher.cancel()
    await store(stub, ["after-cut-1", "after-cut-2"])
    written += ["after-cut-1", "after-cut-2"]

    received: list[str] = []
    token = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(30):
            async for message in call:  # what was in flight, then the status
                received += [stored.event.id for stored in message.events]
                token = message.resume_token
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "resume_token" in (caught.value.details() or "")
    assert token
    resumed = subscribe(reader, resume_token=token)
    rest, _, _ = await read_until(resumed, lambda ids, current: current, timeout=30)
    resumed.cancel()
    received += rest
    assert len(received) == len(set(received))
    assert received == written


async def test_a_write_on_another_replica_wakes_the_feed_by_notify(
    start_server: StartServer, engine: AsyncEngine, connect: Connect
) -> None:
    """The subscriber's replica polls only every 10 s: the event comes by NOTIFY."""
    serving = await start_server(engine, subscribe_poll_seconds=10)
    writing = await start_server(engine)
    call = subscribe(connect(serving.port, "gateway"), start_at_end=True)
    await read_until(call, lambda ids, current: current)
    await asyncio.sleep(0.5)  # the feed's LISTEN takes effect
    await store(connect(writing.port, "processor"), ["elsewhere"])
    ids, _, _ = await read_until(call, lambda ids, _: bool(ids), timeout=8)
    assert ids == ["elsewhere"]
    call.cancel()


async def test_feed_subscribers_with_and_without_a_filter_expression_get_their_matches(
    processor: Stub, gateway: Stub
) -> None:
    calls = {
        "all": subscribe(gateway, start_at_end=True),
        "key": subscribe(gateway, start_at_end=True, filter=event_pb2.EventFilter(keys=["k2"])),
        "expr": subscribe(gateway, start_at_end=True, filter_expression="payload.n >= 3"),
    }
    for call in calls.values():
        await read_until(call, lambda ids, current: current)
    for round_ in range(3):  # rounds of the feed while the subscribers wait
        await store(processor, [f"r{round_}-{n}" for n in range(5)], key=f"k{round_}")
    expected = {
        "all": [f"r{r}-{n}" for r in range(3) for n in range(5)],
        "key": [f"r2-{n}" for n in range(5)],
        "expr": [f"r{r}-{n}" for r in range(3) for n in (3, 4)],
    }
    for name, call in calls.items():
        want = expected[name]

        def enough(ids: list[str], _: bool, want: list[str] = want) -> bool:
            return len(ids) >= len(want)

        ids, _, _ = await read_until(call, enough)
        assert ids == want, name
        call.cancel()
