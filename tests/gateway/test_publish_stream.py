"""The Publish stream through the gateway: acknowledgements in order, and a refused batch reaching
the client with ingest's exact status even while the client is still writing (the gateway reads
ingest's refusal from the stream's messages, so grpc/grpc#36066 cannot mask it)."""

from __future__ import annotations

import collections
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.client import GatewayClient
from tests.gateway.conftest import Stack

TRIALS = 40
"""Before the in-message refusal, about one stream in ten reached the client as UNAVAILABLE."""


def _request(sequence: int, run: str, *, valid: bool = True) -> gateway_pb2.PublishRequest:
    event = event_pb2.Event(id=f"{run}-{sequence}", key=f"{run}-k", type="stream.test")
    if not valid:
        event.key = ""  # refused by ingest: INVALID_ARGUMENT with a field violation
    return gateway_pb2.PublishRequest(sequence=sequence, events=[event])


async def _requests(
    run: str, refused_at: int, total: int
) -> AsyncIterator[gateway_pb2.PublishRequest]:
    for sequence in range(1, total + 1):
        yield _request(sequence, run, valid=sequence != refused_at)


def _field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None, "the status details did not reach the client"
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return [v.field for v in bad_request.field_violations]


async def test_a_refused_batch_reaches_a_writing_client_with_its_exact_status(
    stack: Stack,
) -> None:
    producer = stack.people["producer"]
    outcomes: collections.Counter[str] = collections.Counter()
    for trial in range(TRIALS):
        run = f"ps-{uuid.uuid4().hex[:8]}"
        replies: list[gateway_pb2.PublishResponse] = []
        # The client writes all 60 batches without waiting: when ingest refuses batch 3, the
        # gateway is still forwarding the batches behind it and the client still writing.
        call = stack.gateway.Publish(
            _requests(run, refused_at=3, total=60), metadata=producer.bearer(), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for reply in call:
                replies.append(reply)
        error = caught.value
        outcomes[error.code().name] += 1
        assert [r.sequence for r in replies[:2]] == [1, 2], f"trial {trial}: {replies}"
        assert len(replies) == 3 and replies[2].HasField("refusal"), f"trial {trial}: {replies}"
        refusal = replies[2].refusal
        assert (refusal.sequence, refusal.code) == (3, code_pb2.INVALID_ARGUMENT)
        # The status the stream ends with is the refusal's, whatever the client was doing.
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (
            f"trial {trial}: {error.code().name} {error.details()!r}; so far {dict(outcomes)}"
        )
        assert error.details() == refusal.message
        assert any("key" in name for name in _field_violations(error))
    print(f"\n[publish stream refusal] {TRIALS} streams: {dict(outcomes)}")


async def test_the_sdk_raises_the_refusal_at_once(stack: Stack) -> None:
    run = f"ps-{uuid.uuid4().hex[:8]}"

    async def batches() -> AsyncIterator[list[event_pb2.Event]]:
        for sequence in range(1, 61):
            yield list(_request(sequence, run, valid=sequence != 3).events)

    acked = []
    async with GatewayClient(f"127.0.0.1:{stack.gateway_port}", stack.pki_dir / "ca.pem") as client:
        client.access_token = stack.people["producer"].access_token
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for ack in client.publish(batches(), timeout=10):
                acked.append(ack.sequence)
    assert acked == [1, 2]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert any("key" in name for name in _field_violations(caught.value))
