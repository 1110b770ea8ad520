"""SubscribeEvents at storage over real mTLS and Postgres: what was stored, a `current` marker,
then the live tail in seq order; a resume token continues with no gap and no repeat (also while
writers insert concurrently and the subscriber reconnects again and again); the filter and the
tenant hold; heartbeats; a cancel or a deadline ends the tail (the replica's tail gauge goes back
to 0); limits per principal; a stalled reader stops its tail instead of being buffered for."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeAlias

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh import MeshServer
from tests.storage.conftest import Connect, StartServer, Stub, queued
from tests.storage.test_query_paging import _BY_HAND, _open_transaction

Request = storage_pb2.SubscribeEventsRequest
Stream: TypeAlias = "grpc.aio.UnaryStreamCall[Request, storage_pb2.SubscribeEventsResponse]"


async def store(stub: Stub, ids: list[str], *, tenant: str = "acme", key: str = "k") -> None:
    batch = event_pb2.QueuedBatch(
        events=[queued(key, event_id=i, payload=b'{"n": %d}' % n) for n, i in enumerate(ids)],
        partition=0,
        tenant=tenant,
    )
    await stub.StoreEvents(storage_pb2.StoreEventsRequest(batch=batch), timeout=10)


def subscribe(stub: Stub, **fields: object) -> Stream:
    fields.setdefault("tenant", "acme")
    fields.setdefault("principal", "ana")
    return stub.SubscribeEvents(Request(**fields))  # type: ignore[arg-type]


async def read_until(
    call: Stream, done: Callable[[list[str], bool], bool], timeout: float = 10
) -> tuple[list[str], str, bool]:
    """Event ids received until `done(ids, current_seen)`; the last resume token; whether the
    current marker came (each message's token checked present, seqs checked increasing)."""
    ids: list[str] = []
    token, current, last_seq = "", False, 0
    async with asyncio.timeout(timeout):
        async for message in call:
            assert message.resume_token
            token = message.resume_token
            for stored in message.events:
                assert stored.sequence > last_seq
                last_seq = stored.sequence
                ids.append(stored.event.id)
            current = current or message.current
            if done(ids, current):
                break
    return ids, token, current


def tails(server: MeshServer) -> float:
    value = server.metrics.registry.get_sample_value("streammesh_storage_tails")
    assert value is not None
    return value


async def wait_for(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_stored_then_current_then_live_and_resume_without_gap_or_repeat(
    processor: Stub, gateway: Stub, server: MeshServer
) -> None:
    await store(processor, ["a1", "a2"])
    call = subscribe(gateway)
    ids, _, current = await read_until(call, lambda ids, current: current)
    assert ids == ["a1", "a2"] and current
    await store(processor, ["a3", "a4"])
    more, token, _ = await read_until(call, lambda ids, _: len(ids) == 2)
    assert more == ["a3", "a4"]
    call.cancel()
    await store(processor, ["a5"])  # stored while nobody listens
    resumed = subscribe(gateway, resume_token=token)
    rest, _, current = await read_until(resumed, lambda ids, current: current)
    assert rest == ["a5"] and current
    resumed.cancel()
    await wait_for(lambda: tails(server) == 0)


async def test_start_at_end_skips_what_was_stored(processor: Stub, gateway: Stub) -> None:
    await store(processor, ["old1", "old2"])
    call = subscribe(gateway, start_at_end=True)
    ids, _, current = await read_until(call, lambda ids, current: current)
    assert ids == [] and current
    await store(processor, ["new1"])
    ids, _, _ = await read_until(call, lambda ids, _: bool(ids))
    assert ids == ["new1"]
    call.cancel()


async def test_the_filter_and_the_tenant_hold(processor: Stub, gateway: Stub) -> None:
    call = subscribe(
        gateway,
        filter=event_pb2.EventFilter(keys=["k"]),
        filter_expression="payload.n >= 1",
    )
    await read_until(call, lambda ids, current: current)
    await store(processor, ["x0", "x1", "x2"])  # n = 0, 1, 2
    await store(processor, ["o0", "o1"], key="other")
    await store(processor, ["g0", "g1", "g2"], tenant="globex")
    await store(processor, ["x3", "x4"])  # n = 0, 1: only x4 matches
    ids, _, _ = await read_until(call, lambda ids, _: "x4" in ids)
    assert ids == ["x1", "x2", "x4"]
    call.cancel()


async def test_a_token_of_another_query_or_principal_is_refused(
    processor: Stub, gateway: Stub
) -> None:
    await store(processor, ["t1"])
    call = subscribe(gateway)
    _, token, _ = await read_until(call, lambda ids, current: current)
    call.cancel()
    for fields in ({"principal": "bob"}, {"filter_expression": "payload.n > 0"}):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_until(subscribe(gateway, resume_token=token, **fields), lambda i, c: c)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "resume_token" in (caught.value.details() or "")


async def test_reconnects_while_writers_insert_miss_nothing_and_repeat_nothing(
    processor: Stub, gateway: Stub, server: MeshServer
) -> None:
    """Three writers insert batches until the subscriber has dropped the stream after a
    message (events or the current marker) and resumed with the last token 20 times (bounded:
    at most 100 batches each); then everything acknowledged arrived once, in seq order."""
    written: set[str] = set()
    reconnects = 0

    async def write(writer: int) -> None:
        for batch in range(100):
            if reconnects >= 20 and batch >= 5:
                return
            ids = [f"w{writer}-{batch}-{n}" for n in range(5)]
            await store(processor, ids)
            written.update(ids)
            await asyncio.sleep(0.01)

    writers = asyncio.gather(*(write(w) for w in range(3)))
    received: list[str] = []
    token = ""
    async with asyncio.timeout(90):
        while not writers.done() or len(received) < len(written):
            call = subscribe(gateway, resume_token=token)
            ids, token, _ = await read_until(call, lambda ids, current: bool(ids) or current)
            call.cancel()
            received += ids
            reconnects += 1
    await writers
    assert reconnects >= 20
    assert len(received) == len(set(received)) == len(written)
    assert set(received) == written
    await wait_for(lambda: tails(server) == 0)


async def test_heartbeats_carry_the_token_while_idle(
    start_server: StartServer, engine: AsyncEngine, connect: Connect
) -> None:
    server = await start_server(engine, subscribe_heartbeat_seconds=0.3)
    call = subscribe(connect(server.port, "gateway"))
    messages: list[storage_pb2.SubscribeEventsResponse] = []
    async with asyncio.timeout(5):
        async for message in call:
            messages.append(message)
            if len(messages) == 3:
                break
    call.cancel()
    assert messages[0].current and not messages[1].current and not messages[2].current
    assert all(m.resume_token and not m.events for m in messages)


async def test_a_cancel_or_a_deadline_ends_the_tail(gateway: Stub, server: MeshServer) -> None:
    calls = [subscribe(gateway, principal=f"p{n}") for n in range(3)]
    for call in calls:
        await read_until(call, lambda ids, current: current)
    assert tails(server) == 3
    for call in calls:
        call.cancel()
    await wait_for(lambda: tails(server) == 0)
    timed = gateway.SubscribeEvents(Request(tenant="acme", principal="p"), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_until(timed, lambda ids, current: False)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for(lambda: tails(server) == 0)


async def test_subscriptions_over_the_limit_are_refused(
    start_server: StartServer, engine: AsyncEngine, connect: Connect
) -> None:
    server = await start_server(engine, subscribe_max_per_principal=2)
    stub = connect(server.port, "gateway")
    open_calls = [subscribe(stub), subscribe(stub)]
    for call in open_calls:
        await read_until(call, lambda ids, current: current)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_until(subscribe(stub), lambda ids, current: current)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "concurrent subscriptions" in (caught.value.details() or "")
    other = subscribe(stub, principal="someone-else")  # the limit is per principal
    await read_until(other, lambda ids, current: current)
    open_calls[0].cancel()
    await wait_for(lambda: tails(server) == 2)
    again = subscribe(stub)
    await read_until(again, lambda ids, current: current)
    for call in (open_calls[1], other, again):
        call.cancel()


@contextlib.asynccontextmanager
async def _stalled(stub: Stub) -> AsyncIterator[Stream]:
    call = subscribe(stub)
    try:
        yield call
    finally:
        call.cancel()


async def test_a_stalled_reader_stops_its_tail(
    processor: Stub, gateway: Stub, server: MeshServer
) -> None:
    """20 MB of events wait (40 messages of 500); a subscriber that reads one message and then
    stops gets no more written than flow control and socket buffers let through: the tail waits
    on its write instead of reading on into memory."""
    payload = b'{"pad": "' + b"x" * 1000 + b'"}'
    for batch in range(20):
        events = [queued("big", event_id=f"b{batch}-{n}", payload=payload) for n in range(1000)]
        request = event_pb2.QueuedBatch(events=events, partition=0, tenant="acme")
        await processor.StoreEvents(storage_pb2.StoreEventsRequest(batch=request), timeout=30)

    def sent() -> float:
        value = server.metrics.registry.get_sample_value(
            "grpc_server_msg_sent_total",
            {
                "grpc_type": "server_stream",
                "grpc_service": "streammesh.storage.v1.StorageService",
                "grpc_method": "SubscribeEvents",
            },
        )
        return value or 0.0

    before = sent()
    async with _stalled(gateway) as call:
        first = await call.read()
        assert isinstance(first, storage_pb2.SubscribeEventsResponse) and first.events
        await asyncio.sleep(2)
        stalled_at = sent() - before
        await asyncio.sleep(1)
        assert sent() - before == stalled_at  # the tail stopped, not reading on
    assert stalled_at < 30, stalled_at  # of the 41 messages (40 and the current marker)


async def test_a_lower_seq_committed_late_is_delivered_before_the_higher_one(
    processor: Stub, gateway: Stub, database_url: str, pg_schema: str
) -> None:
    """A transaction draws a seq and holds it while a later insert commits a higher one: the
    tail holds the higher one back until the lower one commits, then sends both, in order."""
    call = subscribe(gateway, tenant="default")
    await read_until(call, lambda ids, current: current)
    async with _open_transaction(database_url, pg_schema) as (slow, transaction):
        await slow.fetchval(_BY_HAND, "late")
        await store(processor, ["after"], tenant="default")
        early = asyncio.ensure_future(read_until(call, lambda ids, _: bool(ids)))
        await asyncio.sleep(1)  # five poll rounds
        assert not early.done()
        await transaction.commit()
    ids, _, _ = await early
    if ids == ["late"]:
        ids += (await read_until(call, lambda ids, _: bool(ids)))[0]
    assert ids == ["late", "after"]
    call.cancel()
