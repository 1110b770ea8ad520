"""A bounded load generator that keeps exact books of what the gateway acknowledged.

Each producer task owns its keys (so per-key publish order is well defined) and sends batches
with unique event ids at a modest rate. On any failure it re-sends the SAME batches (same ids,
the client contract that makes retries idempotent) after the server's RetryInfo delay or a short
backoff, for a bounded number of attempts, then gives them up. Per key, the publish order is
the order in which batches were first sent. Two kinds of producer:

- unary: one PublishBatch call at a time; the next batch only after this one is acknowledged or
  given up;
- streaming: a Publish stream with up to `window` batches in flight, acknowledged in order. When
  the stream fails, or the gateway recycles it (STREAM_RECYCLED, not counted as a failure), a new
  one re-sends every unacknowledged batch, in order, before new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from streammesh.refusals import is_recycled, raise_if_refused
from streammesh.streams import StreamLayout

__all__ = ["LoadGenerator", "LoadReport", "keys_over_partitions", "retry_delay"]

Metadata = tuple[tuple[str, str], ...]


def keys_over_partitions(run: str, layout: StreamLayout, per_partition: int) -> list[str]:
    """Keys named after `run` with exactly `per_partition` of them in every partition."""
    found: dict[int, list[str]] = {p: [] for p in range(layout.partitions)}
    index = 0
    while any(len(keys) < per_partition for keys in found.values()):
        key = f"{run}-k{index}"
        index += 1
        bucket = found[layout.partition_for(key)]
        if len(bucket) < per_partition:
            bucket.append(key)
    # Interleave partitions so that every producer's share covers all of them.
    return [found[p][i] for i in range(per_partition) for p in range(layout.partitions)]


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay in the error's google.rpc.Status details, if any."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                return float(info.retry_delay.ToNanoseconds() / 1e9)
    return None


@dataclass
class LoadReport:
    """The books: every event sent, which were acknowledged, which were given up."""

    event_type: str
    order: dict[str, list[str]] = field(default_factory=dict)
    """key -> event ids in publish order (first attempt)."""
    acked: set[str] = field(default_factory=set)
    given_up: set[str] = field(default_factory=set)
    ack_times: dict[str, float] = field(default_factory=dict)
    """event id -> time.monotonic() of its acknowledgement."""
    batches_acked: int = 0
    attempts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Failed attempts by status code name."""
    error_messages: Counter[str] = field(default_factory=Counter)
    """Failed attempts by API, status code and message."""
    retry_info_delays: list[float] = field(default_factory=list)
    """RetryInfo delays received with RESOURCE_EXHAUSTED."""
    exhausted_without_retry_info: int = 0
    streams_opened: int = 0
    streams_recycled: int = 0
    """Publish streams the gateway ended with STREAM_RECYCLED (re-opened at once)."""
    seconds: float = 0.0

    @property
    def sent(self) -> set[str]:
        return {event_id for ids in self.order.values() for event_id in ids}

    def summary(self) -> dict[str, object]:
        return {
            "sent": len(self.sent),
            "acked": len(self.acked),
            "given_up": len(self.given_up),
            "batches_acked": self.batches_acked,
            "attempts": self.attempts,
            "streams": self.streams_opened,
            "recycled": self.streams_recycled,
            "errors": dict(self.errors),
            "seconds": round(self.seconds, 2),
        }


class LoadGenerator:
    """`producers` tasks, each sending a batch of `batch_size` events every `interval` seconds,
    for `duration` seconds; a batch in retry may run on until `drain_seconds` after that. The
    last `streaming` producers use the Publish stream with `window` batches in flight, the
    others PublishBatch. `padding` adds that many bytes to every payload."""

    def __init__(
        self,
        target: str,
        ca_file: Path,
        metadata: Metadata,
        *,
        run: str,
        keys: list[str],
        producers: int = 2,
        streaming: int = 1,
        window: int = 4,
        batch_size: int = 16,
        interval: float = 0.05,
        max_attempts: int = 80,
        attempt_timeout: float = 5.0,
        max_backoff: float = 1.0,
        drain_seconds: float = 30.0,
        padding: int = 0,
    ) -> None:
        if len(keys) < producers:
            raise ValueError("every producer needs at least one key")
        self._target = target
        self._ca = ca_file.read_bytes()
        self._metadata = metadata
        self._run = run
        self._shares = [keys[p::producers] for p in range(producers)]
        self._streaming = range(producers - streaming, producers)
        self._window = window
        self._batch_size = batch_size
        self._interval = interval
        self._max_attempts = max_attempts
        self._attempt_timeout = attempt_timeout
        self._max_backoff = max_backoff
        self._drain_seconds = drain_seconds
        self._padding = "x" * padding
        self._stop = asyncio.Event()
        self.report = LoadReport(event_type=f"fault.{run}")
        self.acked_batches = asyncio.Event()

    def stop(self) -> None:
        """Stop starting new batches (a batch in retry still finishes or gives up)."""
        self._stop.set()

    async def run(self, duration: float) -> LoadReport:
        started = time.monotonic()
        channel = grpc.aio.secure_channel(
            self._target,
            grpc.ssl_channel_credentials(self._ca),
            options=[("grpc.ssl_target_name_override", "gateway")],
        )
        try:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            end = started + duration
            await asyncio.gather(
                *(
                    (self._produce_stream if index in self._streaming else self._produce)(
                        stub, index, share, end, end + self._drain_seconds
                    )
                    for index, share in enumerate(self._shares)
                )
            )
        finally:
            await channel.close()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _batch(self, producer: int, number: int, share: list[str]) -> list[event_pb2.Event]:
        events = []
        for slot in range(self._batch_size):
            key = share[(number * self._batch_size + slot) % len(share)]
            ids = self.report.order.setdefault(key, [])
            event_id = f"{self._run}-{producer}-{number}-{slot}"
            events.append(
                event_pb2.Event(
                    id=event_id,
                    key=key,
                    type=self.report.event_type,
                    payload=json.dumps({"n": len(ids), "pad": self._padding}).encode(),
                )
            )
            ids.append(event_id)
        return events

    async def _produce(
        self,
        stub: gateway_pb2_grpc.GatewayServiceStub,
        producer: int,
        share: list[str],
        end: float,
        hard_end: float,
    ) -> None:
        report = self.report
        number = 0
        while time.monotonic() < end and not self._stop.is_set():
            batch = self._batch(producer, number, share)
            number += 1
            ids = [event.id for event in batch]
            if await self._send(stub, batch, hard_end):
                self._acked(ids)
            else:
                report.given_up.update(ids)
            await asyncio.sleep(self._interval)

    def _acked(self, ids: list[str]) -> None:
        report = self.report
        report.acked.update(ids)
        report.ack_times.update(dict.fromkeys(ids, time.monotonic()))
        report.batches_acked += 1
        self.acked_batches.set()

    def _failed(self, error: grpc.aio.AioRpcError, attempt: int, api: str) -> float:
        """Book a failed attempt; returns how long to wait before the next one."""
        report = self.report
        code = error.code()
        report.errors[code.name] += 1
        report.error_messages[f"{api} {code.name}: {error.details()}"] += 1
        hinted = retry_delay(error)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if hinted is None:
                report.exhausted_without_retry_info += 1
            else:
                report.retry_info_delays.append(hinted)
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise error  # a broken test set-up, not a fault to ride out
        return min(hinted if hinted is not None else 0.05 * attempt, self._max_backoff)

    async def _send(
        self,
        stub: gateway_pb2_grpc.GatewayServiceStub,
        batch: list[event_pb2.Event],
        hard_end: float,
    ) -> bool:
        """Send until acknowledged; False after max_attempts or past hard_end."""
        report = self.report
        request = gateway_pb2.PublishBatchRequest(events=batch)
        for attempt in range(1, self._max_attempts + 1):
            report.attempts += 1
            try:
                reply = await stub.PublishBatch(
                    request, metadata=self._metadata, timeout=self._attempt_timeout
                )
            except grpc.aio.AioRpcError as error:
                delay = self._failed(error, attempt, "PublishBatch")
                if time.monotonic() + delay > hard_end:
                    return False
                await asyncio.sleep(delay)
                continue
            if reply.accepted != len(batch) or list(reply.event_ids) != [e.id for e in batch]:
                raise AssertionError(f"acknowledgement does not match the batch: {reply}")
            return True
        return False

    async def _produce_stream(
        self,
        stub: gateway_pb2_grpc.GatewayServiceStub,
        producer: int,
        share: list[str],
        end: float,
        hard_end: float,
    ) -> None:
        report = self.report
        unacked: deque[list[event_pb2.Event]] = deque()
        numbers = iter(range(1_000_000_000))
        failures = 0

        def producing() -> bool:
            return time.monotonic() < end and not self._stop.is_set()

        def new_batch() -> list[event_pb2.Event]:
            batch = self._batch(producer, next(numbers), share)
            unacked.append(batch)
            return batch

        while producing() or unacked:
            acked_before = report.batches_acked
            try:
                await self._stream_once(stub, unacked, producing, new_batch, hard_end)
                return
            except grpc.aio.AioRpcError as error:
                if is_recycled(error):
                    # The gateway's documented end of a long stream: not a failure; re-open
                    # at once and resend what was not acknowledged.
                    report.streams_recycled += 1
                    continue
                failures = 0 if report.batches_acked > acked_before else failures + 1
                delay = self._failed(error, failures, "Publish")
            except TimeoutError:
                failures = 0 if report.batches_acked > acked_before else failures + 1
                report.errors["CLIENT_TIMEOUT"] += 1
                delay = 0.1
            if failures >= self._max_attempts or time.monotonic() + delay > hard_end:
                report.given_up.update(e.id for batch in unacked for e in batch)
                return
            await asyncio.sleep(delay)

    async def _stream_once(
        self,
        stub: gateway_pb2_grpc.GatewayServiceStub,
        unacked: deque[list[event_pb2.Event]],
        producing: Callable[[], bool],
        new_batch: Callable[[], list[event_pb2.Event]],
        hard_end: float,
    ) -> None:
        """One Publish stream: re-send the unacknowledged batches, then new ones while
        producing, at most `window` in flight. Returns once production ended and everything
        is acknowledged; raises AioRpcError (or TimeoutError) when the stream fails."""
        self.report.streams_opened += 1
        call = stub.Publish(metadata=self._metadata, timeout=max(1.0, hard_end - time.monotonic()))
        sent: deque[int] = deque()  # the sequence of each unacknowledged batch on this stream
        sequences = iter(range(1, 1_000_000_000))
        room = asyncio.Event()

        async def write(batch: list[event_pb2.Event]) -> None:
            sequence = next(sequences)
            sent.append(sequence)
            self.report.attempts += 1
            await call.write(gateway_pb2.PublishRequest(sequence=sequence, events=batch))

        async def writer() -> None:
            # A failed write means a failed stream: the reader gets its status.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for batch in list(unacked):
                    await write(batch)
                while producing():
                    while len(unacked) >= self._window:
                        room.clear()
                        await room.wait()
                    await write(new_batch())
                    await asyncio.sleep(self._interval)
                await call.done_writing()

        writing = asyncio.create_task(writer())
        try:
            while True:
                async with asyncio.timeout(self._attempt_timeout):
                    reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                raise_if_refused(reply)
                batch = unacked.popleft()
                expected = sent.popleft()
                if reply.sequence != expected or list(reply.event_ids) != [e.id for e in batch]:
                    raise AssertionError(
                        f"stream ack {reply.sequence} does not match batch {expected}: {reply}"
                    )
                self._acked([e.id for e in batch])
                room.set()
            if unacked:
                raise AssertionError(f"stream ended OK with {len(unacked)} batches unacknowledged")
        finally:
            writing.cancel()
            await asyncio.gather(writing, return_exceptions=True)
            call.cancel()
