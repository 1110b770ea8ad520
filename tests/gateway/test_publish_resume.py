"""When ingest stays away, the gateway's resuming is bounded: after `publish_resume_attempts`
new ingest streams without an acknowledgement the client's stream ends with UNAVAILABLE and a
RetryInfo, first as the stream's last message (a PublishRefusal), then as its status.

This module stops its stack's ingest: keep it the last test of its own module.
"""

from __future__ import annotations

import logging
import uuid

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from tests.gateway.conftest import Stack

GATEWAY_SETTINGS = {"publish_resume_attempts": 3, "publish_resume_seconds": 5}

pytestmark = pytest.mark.timeout(60)


def _request(run: str, sequence: int) -> gateway_pb2.PublishRequest:
    event = event_pb2.Event(id=f"{run}-{sequence}", key=f"{run}-k", type="resume.test")
    return gateway_pb2.PublishRequest(sequence=sequence, events=[event])


async def test_resuming_gives_up_with_unavailable_and_retry_info(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.gateway.publish")
    run = f"resume-{uuid.uuid4().hex[:8]}"
    call = stack.gateway.Publish(metadata=stack.people["producer"].bearer(), timeout=30)
    for sequence in (1, 2):
        await call.write(_request(run, sequence))
    assert [(await call.read()).sequence for _ in range(2)] == [1, 2]

    assert stack.ingest_server is not None
    await stack.ingest_server.stop(0)
    await call.write(_request(run, 3))
    replies = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while (reply := await call.read()) is not grpc.aio.EOF:
            replies.append(reply)
            if reply.HasField("refusal"):
                await call.done_writing()
    assert len(replies) == 1 and replies[0].HasField("refusal"), replies
    refusal = replies[0].refusal
    assert refusal.code == code_pb2.UNAVAILABLE and refusal.sequence in (0, 3)
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == refusal.message and error.details().startswith("ingest is")
    status = rpc_status.from_call(error)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in status.details)
    assert retry.retry_delay.seconds == 1
    messages = [record.getMessage() for record in caplog.records]
    assert sum("resuming" in m for m in messages) == 3
    assert sum("giving up after 3 attempts" in m for m in messages) == 1
