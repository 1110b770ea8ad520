"""What the gateway changes on the way through: nothing a client could abuse."""

from __future__ import annotations

import uuid

from services.gateway.relay import convert
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.envelope import assign_missing_ids


def test_a_client_cannot_smuggle_internal_fields() -> None:
    # Field 2 of the internal PublishBatchRequest is `producer`; the public message has no field 2.
    smuggled = ingest_pb2.PublishBatchRequest(producer="victim-subject").SerializeToString()
    public = gateway_pb2.PublishBatchRequest.FromString(smuggled)
    internal = convert(public, ingest_pb2.PublishBatchRequest)
    assert internal.producer == ""
    assert internal.SerializeToString() == b""


def test_missing_event_ids_are_assigned_before_the_first_attempt() -> None:
    events = [event_pb2.Event(id="given", key="k", type="t"), event_pb2.Event(key="k", type="t")]
    assign_missing_ids(events)
    assert events[0].id == "given"
    assert uuid.UUID(events[1].id)


def test_internal_only_reply_fields_do_not_reach_clients() -> None:
    internal = ingest_pb2.PublishBatchResponse(accepted=1)
    raw = internal.SerializeToString() + b"\x7a\x06secret"  # an unknown field 15 from upstream
    public = convert(
        ingest_pb2.PublishBatchResponse.FromString(raw), gateway_pb2.PublishBatchResponse
    )
    assert (
        public.SerializeToString()
        == gateway_pb2.PublishBatchResponse(accepted=1).SerializeToString()
    )
