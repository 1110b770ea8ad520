"""Errors crossing the edge: client-actionable details pass, internal ones never do."""

from __future__ import annotations

import grpc

from streammesh.mesh.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    from_status,
    rich_status_trailers,
)


def test_field_violations_and_retry_hint_survive_a_hop() -> None:
    original = InvalidArgument("bad batch", field_violations=[("events[3].key", "required")])
    relayed = from_status(
        original.code, original.message, service="ingest", trailers=rich_status_trailers(original)
    )
    assert isinstance(relayed, InvalidArgument)
    assert relayed.field_violations == (("events[3].key", "required"),)

    busy = ResourceExhausted("slow down", retry_after_seconds=1.5)
    relayed = from_status(
        busy.code, busy.message, service="ingest", trailers=rich_status_trailers(busy)
    )
    assert isinstance(relayed, ResourceExhausted) and relayed.retry_after_seconds == 1.5


def test_upstream_bugs_stay_internal_without_detail() -> None:
    # A deterministic upstream failure must not look retryable (UNAVAILABLE) to the client.
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
        relayed = from_status(code, "stack trace: secret", service="storage")
        assert relayed.code == grpc.StatusCode.INTERNAL
        assert "secret" not in relayed.message and "storage" in relayed.message


def test_other_upstream_codes_become_unavailable_without_detail() -> None:
    relayed = from_status(grpc.StatusCode.CANCELLED, "secret detail", service="ingest")
    assert isinstance(relayed, Unavailable)
    assert "secret" not in relayed.message and "ingest" in relayed.message


def test_out_of_range_and_aborted_pass_through() -> None:
    for code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ABORTED):
        relayed = from_status(code, "token past retention", service="storage")
        assert relayed.code == code and relayed.message == "token past retention"


def test_garbage_details_are_ignored() -> None:
    relayed = from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad",
        service="x",
        trailers=[("grpc-status-details-bin", b"\xff\x00garbage"), ("other", "v")],
    )
    assert isinstance(relayed, InvalidArgument) and relayed.field_violations == ()
