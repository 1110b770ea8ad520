"""Status codes as go-grpc-prometheus labels them (Go's `codes.Code.String()`), so that the
dashboards and alerts written for Go services work unchanged."""

from __future__ import annotations

import asyncio

import grpc

__all__ = ["GO_CODE_NAMES", "call_code", "code_label"]


def _go_name(code: grpc.StatusCode) -> str:
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"  # Go's spelling
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))


GO_CODE_NAMES: dict[grpc.StatusCode, str] = {code: _go_name(code) for code in grpc.StatusCode}
"""grpc.StatusCode -> "OK", "Canceled", "InvalidArgument", ... "Unauthenticated"."""


def code_label(code: grpc.StatusCode) -> str:
    """The grpc_code label of `code`."""
    return GO_CODE_NAMES[code]


def call_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a server call ended with: what the handler or a layer set (abort, set_code),
    else OK for a return, CANCELLED or DEADLINE_EXCEEDED for a client gone or out of time, and
    UNKNOWN for an exception nothing mapped."""
    code: grpc.StatusCode | None = context.code()
    if code is not None:
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
