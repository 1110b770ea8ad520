"""Refusals on a Publish stream.

A refused batch ends a Publish stream with a status. That status is first sent as the stream's
last message, a `PublishRefusal`, and the server then waits (briefly) for the client to
half-close before it ends the call: ending a call while a grpcio asyncio client is still writing
lets that client replace the server's status with INTERNAL (grpc/grpc#36066). Ingest does this
towards the gateway and the gateway towards its clients; clients turn the message back into the
error the stream ends with.

A stream the gateway recycles ends the same way, with UNAVAILABLE and the google.rpc.ErrorInfo
reason `STREAM_RECYCLED` (RetryInfo 0): every batch acknowledged before it stays accepted, and a
client re-opens the stream at once and resends the rest (see `is_recycled`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.mesh.errors import (
    ERROR_DOMAIN,
    STATUS_DETAILS_KEY,
    StreamMeshError,
    Unavailable,
    from_status_proto,
    grpc_code,
    status_proto,
)

__all__ = [
    "REFUSAL_LINGER_SECONDS",
    "STREAM_RECYCLED",
    "drain_until_half_close",
    "error_reasons",
    "is_recycled",
    "publish_refusal",
    "raise_if_refused",
    "recycled",
    "refusal_error",
    "refusal_rpc_error",
]

STREAM_RECYCLED = "STREAM_RECYCLED"
"""The ErrorInfo reason of a Publish stream the gateway ended so that the client re-opens it on a
fresh connection (its own connection is about to reach its maximum age)."""

REFUSAL_LINGER_SECONDS = 2.0
"""How long a server waits for the client to half-close after a refusal before it ends the
stream with the refusal's status anyway."""


def recycled() -> Unavailable:
    """The status a recycled Publish stream ends with: UNAVAILABLE, reason STREAM_RECYCLED,
    retry at once."""
    return Unavailable(
        "stream recycled: re-open it and resend the batches not acknowledged",
        retry_after_seconds=0,
        error_reason=STREAM_RECYCLED,
    )


def error_reasons(serialized_status: bytes) -> set[str]:
    """The ErrorInfo reasons of our domain in a serialized google.rpc.Status."""
    try:
        status = status_pb2.Status.FromString(serialized_status)
    except DecodeError:
        return set()
    reasons = set()
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            reasons.add(info.reason)
    return reasons


def is_recycled(status: event_pb2.PublishRefusal | grpc.aio.AioRpcError) -> bool:
    """True for the refusal (or the error) of a recycled stream: re-open and resend."""
    if isinstance(status, event_pb2.PublishRefusal):
        code, details = grpc_code(status.code), [status.status_details]
    else:
        code = status.code()
        details = [
            value
            for key, value in status.trailing_metadata() or ()
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes)
        ]
    return code == grpc.StatusCode.UNAVAILABLE and any(
        STREAM_RECYCLED in error_reasons(d) for d in details
    )


def publish_refusal(sequence: int, error: StreamMeshError) -> event_pb2.PublishRefusal:
    status = status_proto(error)
    return event_pb2.PublishRefusal(
        sequence=sequence,
        code=status.code,
        message=status.message,
        status_details=status.SerializeToString(),
    )


def refusal_error(refusal: event_pb2.PublishRefusal, *, service: str) -> StreamMeshError:
    """An upstream's refusal as the error to pass on (see `from_status`)."""
    return from_status_proto(refusal.status_details, service=service)


def refusal_rpc_error(refusal: event_pb2.PublishRefusal) -> grpc.aio.AioRpcError:
    """For clients: the error the refused stream ends with, as grpcio would raise it."""
    trailers = grpc.aio.Metadata()
    if refusal.status_details:
        trailers.add(STATUS_DETAILS_KEY, refusal.status_details)
    return grpc.aio.AioRpcError(
        grpc_code(refusal.code), grpc.aio.Metadata(), trailers, details=refusal.message
    )


def raise_if_refused(reply: gateway_pb2.PublishResponse) -> None:
    """For clients reading a Publish stream: raise the refusal a reply carries, if any, as the
    AioRpcError the stream ends with."""
    if reply.HasField("refusal"):
        raise refusal_rpc_error(reply.refusal)


async def drain_until_half_close(requests: AsyncIterator[object], seconds: float) -> None:
    """Discard what the client still sends until it half-closes, or `seconds` pass (a cancel by
    the client ends the handler anyway)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for _ in requests:
                pass
