"""A limit on the unary calls one mesh client has in flight to its upstream service.

Without one, a slow upstream makes callers queue without bound: every waiting call holds its
request, its caller's task and, at the gateway, a client's connection, until the deadline ends
it. With `max_in_flight` set, the call past the limit fails at once, before anything is sent.

It fails with UNAVAILABLE (ErrorInfo reason `UPSTREAM_CONCURRENCY_LIMIT`, RetryInfo of
`retry_after_seconds`), the code that means "not now, try again later": the request was not
looked at, so nothing about it is wrong, and callers already treat UNAVAILABLE as an outage to
wait out (the processor retries the delivery later without counting it toward dead-lettering,
the SDK and the bench back off). Not RESOURCE_EXHAUSTED: that one is a verdict on the caller
(quota, a query too large) that callers count or give up on. The mesh client itself does not
retry it: the limit covers every replica of the upstream, so an immediate retry would meet
the same full limit and only add load. The ejector never counts it (no replica was called).

Streams are not counted: they live as long as their callers want (subscriptions, publish
streams), and are bounded where they are opened (the gateway's per-client limits).
"""

from __future__ import annotations

import grpc

from streammesh.mesh.errors import Unavailable, rich_status_trailers

__all__ = ["CONCURRENCY_LIMIT_REASON", "ConcurrencyLimit"]

CONCURRENCY_LIMIT_REASON = "UPSTREAM_CONCURRENCY_LIMIT"
"""The google.rpc.ErrorInfo reason of a call refused by the limit."""


class ConcurrencyLimit:
    """Counts the calls in flight to one upstream; `acquire` refuses the one past the limit."""

    def __init__(
        self, upstream: str, max_in_flight: int | None, *, retry_after_seconds: float = 0.1
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1 (None: no limit)")
        self.upstream = upstream
        self.max_in_flight = max_in_flight
        self.retry_after_seconds = retry_after_seconds
        self.in_flight = 0
        """Calls holding a slot now."""
        self.refused = 0
        """Calls refused so far."""

    def acquire(self) -> None:
        """Take a slot, or raise the refusal (a grpc.aio.AioRpcError, as a failed call does)."""
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            self.refused += 1
            raise self._refusal()
        self.in_flight += 1

    def release(self) -> None:
        """Give the slot back (once per successful `acquire`)."""
        self.in_flight -= 1

    def _refusal(self) -> grpc.aio.AioRpcError:
        error = Unavailable(
            f"{self.upstream}: {self.max_in_flight} calls in flight from this process, the"
            " limit; try again shortly",
            retry_after_seconds=self.retry_after_seconds,
            error_reason=CONCURRENCY_LIMIT_REASON,
        )
        return grpc.aio.AioRpcError(
            error.code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*rich_status_trailers(error)),
            details=error.message,
        )
