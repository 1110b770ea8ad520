"""The one exception tree every service raises, and its mapping to gRPC status codes.

Handlers raise a `StreamMeshError` subclass; the runtime's interceptor turns it into a status with a
`google.rpc.Status` in the trailers (BadRequest field violations, RetryInfo), so clients and
grpcurl see a precise code and message. Anything else becomes INTERNAL with a generic message.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2

__all__ = [
    "ERROR_DOMAIN",
    "STATUS_DETAILS_KEY",
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamMeshError",
    "Unauthenticated",
    "Unavailable",
    "UpstreamFailed",
    "from_rpc_error",
    "from_status",
    "from_status_proto",
    "grpc_code",
    "rich_status_trailers",
    "status_proto",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN = "streammesh"
"""The google.rpc.ErrorInfo domain of the reasons StreamMesh documents."""


class StreamMeshError(Exception):
    """Base of all errors a handler may raise on purpose; `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after_seconds: float | None = None,
        error_reason: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field_violations = tuple(field_violations)
        self.retry_after_seconds = retry_after_seconds
        self.error_reason = error_reason
        """A documented google.rpc.ErrorInfo reason (UPPER_SNAKE_CASE) clients may act on;
        sent to the client, unlike the audit reasons some subclasses keep."""


class InvalidArgument(StreamMeshError):
    """The request is malformed; `field_violations` names the fields."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(StreamMeshError):
    """No valid credentials: missing/invalid token, wrong password or code."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(StreamMeshError):
    """The caller is known but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(StreamMeshError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StreamMeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(StreamMeshError):
    """The system is not in the state the call needs (for example TOTP not enrolled)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(StreamMeshError):
    """A position past what exists: a page or resume token whose events the retention removed
    (the client starts again from a time instead)."""

    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(StreamMeshError):
    """Back-pressure or a size limit; `retry_after_seconds` hints when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StreamMeshError):
    """A dependency is down; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class Aborted(StreamMeshError):
    """A concurrency conflict the caller resolves at a higher level (re-read, then retry)."""

    code = grpc.StatusCode.ABORTED


class UpstreamFailed(StreamMeshError):
    """An upstream's own bug (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED), relayed as INTERNAL
    without its detail: a deterministic failure that retrying would only repeat."""

    code = grpc.StatusCode.INTERNAL


class DeadlineExceeded(StreamMeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[StreamMeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        OutOfRange,
        ResourceExhausted,
        Aborted,
        Unavailable,
        DeadlineExceeded,
    )
}

# An upstream's bug: relayed as INTERNAL, not as a retryable UNAVAILABLE, so that clients and
# the mesh's retry policy do not repeat a call that will fail the same way.
_UPSTREAM_BUGS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def status_proto(error: StreamMeshError) -> status_pb2.Status:
    """The error as a google.rpc.Status: code, message, ErrorInfo, BadRequest and RetryInfo
    details."""
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message)
    if error.error_reason:
        status.details.add().Pack(
            error_details_pb2.ErrorInfo(reason=error.error_reason, domain=ERROR_DOMAIN)
        )
    if error.field_violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                for field, description in error.field_violations
            ]
        )
        status.details.add().Pack(bad_request)
    if error.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_seconds * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def rich_status_trailers(error: StreamMeshError) -> tuple[tuple[str, bytes], ...]:
    """Encode the error as a google.rpc.Status trailer (what grpcio-status clients decode)."""
    status = status_proto(error)
    if not status.details:
        return ()
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def from_rpc_error(error: grpc.aio.AioRpcError, *, service: str) -> StreamMeshError:
    """Re-raise a downstream failure at the edge; see from_status."""
    return from_status(
        error.code(), error.details(), service=service, trailers=error.trailing_metadata()
    )


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def grpc_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code number (UNKNOWN for numbers gRPC lacks)."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def from_status_proto(serialized: bytes, *, service: str) -> StreamMeshError:
    """Re-raise a status that `service` sent serialized (google.rpc.Status) in a message, such
    as a PublishRefusal; see from_status."""
    try:
        status = status_pb2.Status.FromString(serialized)
    except DecodeError:
        return Unavailable(f"{service} failed; try again later")
    return from_status(
        grpc_code(status.code),
        status.message,
        service=service,
        trailers=((STATUS_DETAILS_KEY, serialized),),
    )


def from_status(
    code: grpc.StatusCode,
    details: str | None,
    *,
    service: str,
    trailers: Iterable[tuple[str, str | bytes]] | None = None,
) -> StreamMeshError:
    """Client-caused codes pass through with their message and the details a client can act on
    (BadRequest field violations, RetryInfo; nothing else crosses). An upstream's bug (INTERNAL,
    UNKNOWN, DATA_LOSS, UNIMPLEMENTED) becomes INTERNAL naming the service, anything else
    (CANCELLED, ...) UNAVAILABLE; neither carries the upstream's detail."""
    if code in _UPSTREAM_BUGS:
        return UpstreamFailed(f"{service} failed with an internal error (logged by {service})")
    cls = _BY_CODE.get(code)
    if cls is None:
        return Unavailable(f"{service} failed; try again later")
    if cls is Unavailable or cls is DeadlineExceeded:
        return cls(f"{service} is unavailable: {details or code.name}")
    violations, retry_after = _actionable_details(trailers or ())
    return cls(details or code.name, field_violations=violations, retry_after_seconds=retry_after)


def _actionable_details(
    trailers: Iterable[tuple[str, str | bytes]],
) -> tuple[list[tuple[str, str]], float | None]:
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    for key, value in trailers:
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            continue
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            retry_info = error_details_pb2.RetryInfo()
            if detail.Unpack(bad_request):
                violations += [(v.field, v.description) for v in bad_request.field_violations]
            elif detail.Unpack(retry_info):
                retry_after = retry_info.retry_delay.ToNanoseconds() / 1e9
    return violations, retry_after
