"""How the CLI reports a refused call: the status, then every detail the server attached.

Services put a `google.rpc.Status` in the `grpc-status-details-bin` trailer (see
`streammesh.mesh.errors`): BadRequest field violations, RetryInfo, and sometimes ErrorInfo. The
status line alone ("INVALID_ARGUMENT: invalid account") hides what to fix, so every command
prints its failures through `describe_rpc_error`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from streammesh.mesh.errors import STATUS_DETAILS_KEY

__all__ = ["describe_rpc_error", "detail_lines"]


class _FailedCall(Protocol):
    """What grpc.aio.AioRpcError and a failed synchronous grpc.Call both offer."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> object: ...


def describe_rpc_error(error: _FailedCall) -> str:
    """`CODE: message`, then one indented line per detail of the rich status, if any."""
    lines = [f"{error.code().name}: {error.details() or '(no message)'}"]
    status = _rich_status(error)
    if status is not None:
        lines += [f"  {line}" for line in detail_lines(status.details)]
    return "\n".join(lines)


def _rich_status(error: _FailedCall) -> status_pb2.Status | None:
    # Read the trailer directly: grpc_status's from_call refuses one whose code or message
    # differs from the call's, and the details are still the server's own.
    for key, value in _pairs(error.trailing_metadata()):
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def _pairs(metadata: object) -> Iterable[tuple[str, str | bytes]]:
    if metadata is None:
        return ()
    return [(str(key), value) for key, value in metadata]  # type: ignore[attr-defined]


def detail_lines(details: Iterable[any_pb2.Any]) -> list[str]:
    """One human line per google.rpc detail; unknown types are named, not dropped."""
    lines: list[str] = []
    for detail in details:
        lines += _describe(detail)
    return lines


def _describe(detail: any_pb2.Any) -> list[str]:
    bad_request = error_details_pb2.BadRequest()
    if detail.Unpack(bad_request):
        return [f"{v.field or '(request)'}: {v.description}" for v in bad_request.field_violations]
    retry = error_details_pb2.RetryInfo()
    if detail.Unpack(retry):
        seconds = retry.retry_delay.ToNanoseconds() / 1e9
        return [f"retry after {seconds:.3g} s"]
    info = error_details_pb2.ErrorInfo()
    if detail.Unpack(info):
        extra = "".join(f" {key}={value}" for key, value in sorted(info.metadata.items()))
        return [f"reason: {info.reason} (domain {info.domain}){extra}"]
    precondition = error_details_pb2.PreconditionFailure()
    if detail.Unpack(precondition):
        return [f"{v.type} {v.subject}: {v.description}" for v in precondition.violations]
    quota = error_details_pb2.QuotaFailure()
    if detail.Unpack(quota):
        return [f"quota {v.subject}: {v.description}" for v in quota.violations]
    resource = error_details_pb2.ResourceInfo()
    if detail.Unpack(resource):
        return [f"{resource.resource_type} {resource.resource_name}: {resource.description}"]
    localized = error_details_pb2.LocalizedMessage()
    if detail.Unpack(localized):
        return [localized.message]
    help_links = error_details_pb2.Help()
    if detail.Unpack(help_links):
        return [f"see {link.url} ({link.description})" for link in help_links.links]
    return [f"detail of type {detail.type_url.rsplit('/', 1)[-1]}"]
