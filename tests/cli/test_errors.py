"""The CLI's one error formatter: every detail of a rich status is printed."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from streammesh.cli.errors import describe_rpc_error
from streammesh.mesh.errors import (
    STATUS_DETAILS_KEY,
    InvalidArgument,
    ResourceExhausted,
    rich_status_trailers,
)


def _error(
    code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, bytes], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details=details
    )


def test_every_field_violation_is_printed() -> None:
    refusal = InvalidArgument(
        "invalid account",
        field_violations=[
            ("username", "must be 3 to 64 characters"),
            ("password", "is a commonly used password; choose a longer or less common one"),
        ],
    )
    text = describe_rpc_error(_error(refusal.code, refusal.message, rich_status_trailers(refusal)))
    assert text.splitlines() == [
        "INVALID_ARGUMENT: invalid account",
        "  username: must be 3 to 64 characters",
        "  password: is a commonly used password; choose a longer or less common one",
    ]


def test_retry_delay_is_printed() -> None:
    refusal = ResourceExhausted("too many failed attempts; retry later", retry_after_seconds=2.5)
    text = describe_rpc_error(_error(refusal.code, refusal.message, rich_status_trailers(refusal)))
    assert text.splitlines() == [
        "RESOURCE_EXHAUSTED: too many failed attempts; retry later",
        "  retry after 2.5 s",
    ]


def test_error_info_and_unknown_details_are_printed() -> None:
    status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message="not enrolled")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(
            reason="TOTP_NOT_ENROLLED", domain="auth.streammesh", metadata={"user": "ada"}
        )
    )
    status.details.add().Pack(duration_pb2.Duration(seconds=1))
    trailers = ((STATUS_DETAILS_KEY, status.SerializeToString()),)
    text = describe_rpc_error(_error(grpc.StatusCode.FAILED_PRECONDITION, "not enrolled", trailers))
    assert text.splitlines() == [
        "FAILED_PRECONDITION: not enrolled",
        "  reason: TOTP_NOT_ENROLLED (domain auth.streammesh) user=ada",
        "  detail of type google.protobuf.Duration",
    ]


def test_details_are_kept_when_the_trailer_message_differs() -> None:
    # A proxy may reword the status message; grpcio-status then refuses the trailer, but the
    # field violations are still the server's and still tell the user what to fix.
    refusal = InvalidArgument("invalid account", field_violations=[("password", "too short")])
    text = describe_rpc_error(
        _error(refusal.code, "refused upstream", rich_status_trailers(refusal))
    )
    assert text.splitlines() == ["INVALID_ARGUMENT: refused upstream", "  password: too short"]


def test_a_plain_status_prints_one_line() -> None:
    assert describe_rpc_error(_error(grpc.StatusCode.UNAVAILABLE, "gateway down")) == (
        "UNAVAILABLE: gateway down"
    )
    broken = ((STATUS_DETAILS_KEY, b"\xff\xff not a status"),)
    assert describe_rpc_error(_error(grpc.StatusCode.INTERNAL, "x", broken)) == "INTERNAL: x"
