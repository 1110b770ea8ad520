"""The gateway's Publish relay: one client stream carried over as many ingest streams as it takes.

Ingest servers recycle their connections (max connection age), and replicas restart; either ends
the ingest stream with UNAVAILABLE while the client's stream is still wanted. The relay keeps an
ordered window of the batches it forwarded and ingest has not acknowledged yet. When the ingest
stream ends with UNAVAILABLE it opens a new one (the channel has reconnected, or reconnects) and
resends the window in order: event ids make a resent batch idempotent downstream (the gateway
assigned the missing ids before the first attempt), so nothing is lost or stored twice. Upstream
sequences are the relay's own, one per forwarded batch, so each acknowledgement maps to exactly
one client batch and the client sees each of its batches acknowledged once and in order.

Resuming is bounded (attempts and seconds without progress); then the client's stream ends with
UNAVAILABLE and a RetryInfo. A refusal from ingest (PublishRefusal) is never resumed: it is
passed on as it is.

The gateway's own listener also recycles connections. A client's stream is therefore ended by
the relay itself at `stream_max_age` (before the listener's grace cuts it): it stops forwarding,
waits until ingest acknowledged every batch in flight, and sends a last message, a
PublishRefusal with UNAVAILABLE, ErrorInfo reason STREAM_RECYCLED and RetryInfo 0. The client
re-opens the stream and resends what was not acknowledged (streammesh.refusals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from services.gateway.relay import convert
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.envelope import assign_missing_ids
from streammesh.mesh.errors import StreamMeshError, Unavailable, from_status
from streammesh.refusals import (
    REFUSAL_LINGER_SECONDS,
    publish_refusal,
    recycled,
    refusal_error,
)

__all__ = ["PublishRelay", "RelayLimits"]

log = logging.getLogger(__name__)

UpstreamCall = Any
"""An ingest Publish call (grpc.aio.StreamStreamCall) in reader/writer style."""


def _collect_forwarder(task: asyncio.Task[None]) -> None:
    """Take a request forwarder's outcome, so asyncio never reports it as lost. A domain error
    (a request that did not decode) already ended the call through the interceptor; anything
    else is a bug, logged here because nobody awaits the task."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, StreamMeshError):
        log.error("the Publish request forwarder failed", exc_info=error)


@dataclass(frozen=True)
class RelayLimits:
    """How much one client stream may hold for resending, and how long it lives."""

    window_batches: int
    """Forwarded batches not yet acknowledged by ingest, at most (the client is not read while
    the window is full: that is the stream's back-pressure)."""
    window_bytes: int
    """Their size, at most (one batch always fits)."""
    resume_attempts: int
    """Ingest streams opened in a row without an acknowledgement before the client's stream
    fails."""
    resume_seconds: float
    """... or this long since the first failure of such a row."""
    stream_max_age: float
    """The client's stream is recycled (STREAM_RECYCLED) at this age."""
    recycle_drain_seconds: float = 5.0
    """At recycling, how long to wait for ingest to acknowledge the batches in flight; those
    still pending after it are left to the client to resend."""
    retry_after_seconds: float = 1.0
    """The RetryInfo delay when resuming gave up."""


@dataclass
class _Pending:
    upstream_sequence: int
    client_sequence: int
    request: ingest_pb2.PublishRequest
    size: int


@dataclass
class _Ended:
    """The end of one ingest stream."""

    code: grpc.StatusCode
    details: str
    trailers: Any


def _resumable(ended: _Ended) -> bool:
    # UNAVAILABLE: a GOAWAY (max connection age) cut, a reset connection, a replica that
    # stopped. Anything else (a deadline, a cancel, a bug) is passed on, not retried.
    # grpc.aio's client reports a stream cut while it is still writing as INTERNAL "Internal
    # error from Core" (grpc/grpc#36066): seen in CI for exactly these cuts, so resumed too.
    if ended.code == grpc.StatusCode.INTERNAL and ended.details == "Internal error from Core":
        return True
    return bool(ended.code == grpc.StatusCode.UNAVAILABLE)


class PublishRelay:
    """Relays one client Publish stream to ingest; see the module docstring."""

    def __init__(
        self,
        open_upstream: Callable[[], UpstreamCall],
        limits: RelayLimits,
        *,
        producer: str,
        tenant: str = "",
    ) -> None:
        self._open_upstream = open_upstream
        self._limits = limits
        self._producer = producer
        self._tenant = tenant
        self._window: deque[_Pending] = deque()
        self._window_bytes = 0
        self._room = asyncio.Event()
        self._lock = asyncio.Lock()  # one writer to the current ingest call at a time, in order
        self._replies: asyncio.Queue[tuple[int, ingest_pb2.PublishResponse | _Ended]] = (
            asyncio.Queue()
        )
        self._call: UpstreamCall = None
        self._generation = 0
        self._readers: set[asyncio.Task[None]] = set()
        self._sequence = 0
        self._client_done = False
        self._stopped = False
        self._failures = 0
        self._failing_since: float | None = None
        self._opened_at = 0.0

    async def relay(
        self, requests: AsyncIterator[gateway_pb2.PublishRequest]
    ) -> AsyncIterator[gateway_pb2.PublishResponse]:
        """Acknowledgements (and at most one final refusal) for the client, in order; raises
        the status the client's stream ends with, if not OK."""
        loop = asyncio.get_running_loop()
        self._switch_upstream()
        forwarder = asyncio.create_task(self._forward(requests), name="publish-forwarder")
        forwarder.add_done_callback(_collect_forwarder)
        recycle_at: float | None = loop.time() + self._limits.stream_max_age
        drain_until: float | None = None
        final: StreamMeshError | None = None
        final_sequence = 0
        try:
            while final is None:
                until = drain_until if drain_until is not None else recycle_at
                try:
                    async with asyncio.timeout_at(until):
                        generation, item = await self._replies.get()
                except TimeoutError:
                    if drain_until is not None:
                        final = recycled()  # what is still in flight, the client resends
                    elif not self._client_done:
                        drain_until = self._begin_recycle(loop.time())
                        if not self._window:
                            final = recycled()
                    else:
                        recycle_at = None  # half-closed: the stream ends on its own
                    continue
                if generation != self._generation:
                    continue  # a reply or the end of an ingest stream already left behind
                if isinstance(item, _Ended):
                    if item.code == grpc.StatusCode.OK and self._client_done and not self._window:
                        return
                    try:
                        await self._resume_or_raise(item)
                    except StreamMeshError as error:
                        final, final_sequence = error, self._first_pending()
                    continue
                if item.HasField("refusal"):
                    final = refusal_error(item.refusal, service="ingest")
                    final_sequence = self._client_sequence(item.refusal.sequence)
                    continue
                yield self._acknowledge(item)
                if drain_until is not None and not self._window:
                    final = recycled()
            yield gateway_pb2.PublishResponse(refusal=publish_refusal(final_sequence, final))
            self._stop_forwarding()
            # Read the client to its half-close (or a short linger) before ending the call:
            # see streammesh.refusals on why.
            await asyncio.wait({forwarder}, timeout=REFUSAL_LINGER_SECONDS)
            raise final
        finally:
            self._stop_forwarding()
            forwarder.cancel()
            if self._call is not None:
                self._call.cancel()
            for reader in self._readers:
                reader.cancel()
            await asyncio.gather(forwarder, *self._readers, return_exceptions=True)

    def _begin_recycle(self, now: float) -> float:
        self._stopped = True
        self._room.set()
        log.info(
            "recycling a Publish stream at its maximum age (%d batches in flight)",
            len(self._window),
        )
        return now + self._limits.recycle_drain_seconds

    def _stop_forwarding(self) -> None:
        self._stopped = True
        self._room.set()
        if self._call is not None:
            self._call.cancel()  # nothing more goes to ingest; its reply is in hand or moot

    def _first_pending(self) -> int:
        return self._window[0].client_sequence if self._window else 0

    def _client_sequence(self, upstream_sequence: int) -> int:
        for pending in self._window:
            if pending.upstream_sequence == upstream_sequence:
                return pending.client_sequence
        return self._first_pending()

    def _acknowledge(self, reply: ingest_pb2.PublishResponse) -> gateway_pb2.PublishResponse:
        if not self._window or self._window[0].upstream_sequence != reply.sequence:
            # Ingest acknowledges in order; anything else is a bug worth a loud stop.
            expected = self._window[0].upstream_sequence if self._window else None
            log.error("ingest acknowledged %d, expected %s", reply.sequence, expected)
            raise Unavailable("ingest failed; try again later", retry_after_seconds=1.0)
        pending = self._window.popleft()
        self._window_bytes -= pending.size
        self._room.set()
        self._failures, self._failing_since = 0, None  # progress ends a row of failures
        public = convert(reply, gateway_pb2.PublishResponse)
        public.sequence = pending.client_sequence
        return public

    async def _resume_or_raise(self, ended: _Ended) -> None:
        """Open a new ingest stream and resend the window, or raise the client's status."""
        if not _resumable(ended):
            # Not a connection cut: passed on. Logged, because the client sees only a generic
            # UNAVAILABLE for codes it must not learn the details of (INTERNAL, CANCELLED...).
            log.warning(
                "ingest stream ended (%s: %s); not resumable", ended.code.name, ended.details
            )
            raise from_status(ended.code, ended.details, service="ingest", trailers=ended.trailers)
        now = time.monotonic()
        if self._failing_since is None or now - self._opened_at > self._limits.resume_seconds:
            # The stream that ended had lived on its own (say, to its max connection age):
            # this is a new row of failures, not one more of the last.
            self._failures, self._failing_since = 0, now
        self._failures += 1
        if (
            self._failures > self._limits.resume_attempts
            or now - self._failing_since > self._limits.resume_seconds
        ):
            log.warning(
                "ingest stream ended (%s: %s); giving up after %d attempts in %.1fs",
                ended.code.name,
                ended.details,
                self._failures - 1,
                now - self._failing_since,
            )
            raise Unavailable(
                f"ingest is unavailable: {ended.details or ended.code.name}",
                retry_after_seconds=self._limits.retry_after_seconds,
            )
        # The first attempt goes at once (after a GOAWAY the channel is already connecting);
        # later ones back off (0.25 s doubling to 2 s: eight attempts span about the default
        # ten seconds), so that a replica restarting has time to come back.
        delay = min(0.25 * 2 ** (self._failures - 2), 2.0) if self._failures > 1 else 0.0
        log.info(
            "ingest stream ended (%s: %s); resuming (attempt %d) with %d batches to resend",
            ended.code.name,
            ended.details,
            self._failures,
            len(self._window),
        )
        if delay:
            await asyncio.sleep(delay)
        async with self._lock:
            self._switch_upstream()
            for pending in list(self._window):
                await self._write(pending.request)
            if self._client_done:
                await self._done_writing()

    def _switch_upstream(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._generation += 1
        self._opened_at = time.monotonic()
        self._call = self._open_upstream()
        reader = asyncio.create_task(
            self._read_upstream(self._call, self._generation), name="publish-upstream-reader"
        )
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)

    async def _read_upstream(self, call: UpstreamCall, generation: int) -> None:
        # Its own task: cancelling a pending read would cancel the call.
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                self._replies.put_nowait((generation, reply))
            ended = _Ended(await call.code(), await call.details() or "", None)
        except grpc.aio.AioRpcError as error:
            ended = _Ended(error.code(), error.details() or "", error.trailing_metadata())
        self._replies.put_nowait((generation, ended))

    async def _write(self, request: ingest_pb2.PublishRequest) -> None:
        # A failed write means the ingest stream ended: its reader reports why, and the resume
        # resends this batch with the rest of the window.
        with contextlib.suppress(
            grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
        ):
            await self._call.write(request)

    async def _done_writing(self) -> None:
        with contextlib.suppress(
            grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError
        ):
            await self._call.done_writing()

    async def _wait_for_room(self, size: int) -> None:
        limits = self._limits
        while (
            self._window
            and not self._stopped
            and (
                len(self._window) >= limits.window_batches
                or self._window_bytes + size > limits.window_bytes
            )
        ):
            self._room.clear()
            await self._room.wait()

    async def _forward(self, requests: AsyncIterator[gateway_pb2.PublishRequest]) -> None:
        # Read the client to its half-close even after forwarding stopped: that is what the
        # final message's linger waits for.
        async for request in requests:
            if self._stopped:
                continue
            internal = convert(request, ingest_pb2.PublishRequest)
            internal.producer = self._producer
            internal.tenant = self._tenant
            assign_missing_ids(internal.events)
            size = internal.ByteSize()
            await self._wait_for_room(size)
            async with self._lock:
                if self._stopped:
                    continue
                self._sequence += 1
                internal.sequence = self._sequence
                self._window.append(_Pending(self._sequence, request.sequence, internal, size))
                self._window_bytes += size
                await self._write(internal)
        async with self._lock:
            self._client_done = True
            if not self._stopped:
                await self._done_writing()
