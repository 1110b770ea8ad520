"""Publish streams across connection ages: ingest recycles its connections every ~2 s and the
gateway recycles its clients' streams every 3 s, while one client stream keeps publishing.

The gateway must carry its client's stream over new ingest streams (resending what ingest had
not acknowledged) and end the client's own stream only with STREAM_RECYCLED, which the SDK
follows by itself: the caller sees every batch acknowledged once, in order, and no error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.client import GatewayClient, _PublishBooks
from streammesh.entries import entry_body
from streammesh.refusals import STREAM_RECYCLED
from tests.conftest import xrange_entries
from tests.gateway.conftest import Stack

INGEST_SETTINGS = {"max_connection_age_seconds": 2, "max_connection_age_grace_seconds": 1}
GATEWAY_SETTINGS = {
    "max_connection_age_seconds": 3,
    "publish_stream_max_age_seconds": 3,
    "max_connection_age_grace_seconds": 13,
}

pytestmark = pytest.mark.timeout(90)

SECONDS = 12.0
BATCH = 20
INTERVAL = 0.01


def _events(run: str, number: int) -> list[event_pb2.Event]:
    return [
        event_pb2.Event(id=f"{run}-{number}-{slot}", key=f"{run}-k{slot % 4}", type="age.test")
        for slot in range(BATCH)
    ]


async def _stream_ids(stack: Stack) -> Counter[str]:
    """How often each event id was appended to the stack's streams (a resend may append a
    batch twice; storage's idempotent insert keeps one)."""
    counts: Counter[str] = Counter()
    for stream in stack.layout.streams():
        for _entry_id, fields in await xrange_entries(stack.redis, stream):
            batch = entry_body(fields).batch()
            counts.update(queued.event.id for queued in batch.events)
    return counts


async def test_a_long_stream_survives_connection_ages(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.gateway.publish")
    run = f"age-{uuid.uuid4().hex[:8]}"
    sent: list[int] = []

    async def batches() -> AsyncIterator[list[event_pb2.Event]]:
        end = time.monotonic() + SECONDS
        number = 0
        while time.monotonic() < end:
            number += 1
            sent.append(number)
            yield _events(run, number)
            await asyncio.sleep(INTERVAL)

    acked: list[gateway_pb2.PublishResponse] = []
    async with GatewayClient(f"127.0.0.1:{stack.gateway_port}", stack.pki_dir / "ca.pem") as client:
        client.access_token = stack.people["producer"].access_token
        async for ack in client.publish(batches(), window=8):
            acked.append(ack)
        recycled = client.recycled_streams

    resumes = sum("resuming" in r.getMessage() for r in caplog.records)
    recycles = sum("recycling a Publish stream" in r.getMessage() for r in caplog.records)
    print(
        f"\n[connection age] {len(sent)} batches in {SECONDS:.0f}s; ingest streams resumed "
        f"{resumes}x, client streams recycled {recycles}x (client re-opened {recycled}x)"
    )
    assert [a.sequence for a in acked] == sent, "every batch acknowledged once, in order"
    for ack in acked:
        assert list(ack.event_ids) == [e.id for e in _events(run, int(ack.sequence))]
    assert resumes >= 3, "ingest's connection ages were crossed"
    assert recycled >= 2 and recycles >= recycled, "the client's own stream was recycled"
    appended = await _stream_ids(stack)
    missing = {e for a in acked for e in a.event_ids} - set(appended)
    assert not missing, f"{len(missing)} acknowledged events never reached the queue"


async def test_a_recycled_stream_ends_with_the_documented_status(stack: Stack) -> None:
    """What an independent client sees: acks for everything in flight, then a PublishRefusal
    and the status UNAVAILABLE with ErrorInfo STREAM_RECYCLED and RetryInfo 0."""
    run = f"age-{uuid.uuid4().hex[:8]}"
    producer = stack.people["producer"]
    call = stack.gateway.Publish(metadata=producer.bearer(), timeout=30)
    for number in range(1, 4):
        await call.write(gateway_pb2.PublishRequest(sequence=number, events=_events(run, number)))
    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while (reply := await call.read()) is not grpc.aio.EOF:
            replies.append(reply)
            if reply.HasField("refusal"):
                await call.done_writing()
    assert [r.sequence for r in replies[:3]] == [1, 2, 3]
    assert len(replies) == 4 and replies[3].HasField("refusal")
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == replies[3].refusal.message
    status = rpc_status.from_call(error)
    assert status is not None
    reasons, delays = [], []
    for detail in status.details:
        info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reasons.append((info.domain, info.reason))
        elif detail.Unpack(retry):
            delays.append(retry.retry_delay.ToNanoseconds())
    assert reasons == [("streammesh", STREAM_RECYCLED)] and delays == [0]


async def test_the_sdk_raises_what_the_callers_batches_raise(stack: Stack) -> None:
    """The SDK reads the caller's iterator in a task of its own; its failure must reach the
    caller as it is, not as a cancelled call."""
    run = f"age-{uuid.uuid4().hex[:8]}"

    async def batches() -> AsyncIterator[list[event_pb2.Event]]:
        for number in range(1, 4):
            yield _events(run, number)
        raise ValueError("the producer broke")

    acked = []
    async with GatewayClient(f"127.0.0.1:{stack.gateway_port}", stack.pki_dir / "ca.pem") as client:
        client.access_token = stack.people["producer"].access_token
        with pytest.raises(ValueError, match="the producer broke"):
            async for ack in client.publish(batches(), timeout=10):
                acked.append(ack.sequence)
    assert acked == [1, 2, 3][: len(acked)]


async def test_the_sdk_gives_id_less_events_an_id_before_the_first_send() -> None:
    """A resent batch must carry the ids of its first send; the gateway would otherwise give
    each send new ones, and a batch in flight at a recycle could be stored twice."""
    events = [event_pb2.Event(key="age-k", type="age.test") for _ in range(3)]

    async def batches() -> AsyncIterator[list[event_pb2.Event]]:
        yield events

    books = _PublishBooks(batches(), window=4)
    request = await books._next_request()
    assert request is not None and request.sequence == 1
    assert len({event.id for event in request.events}) == 3 and all(
        event.id for event in request.events
    )
    assert all(not event.id for event in events), "the caller's messages are left as they are"
    assert await books._next_request() is None
