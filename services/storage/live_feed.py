"""One shared read of a tailed table per tenant (a Feed), fanned out to that tenant's live
subscriptions (Subscribers), each with a bounded buffer.

A feed holds a position: every row of its tenant with a seq at or below it is settled (no lower
seq can still commit: services.storage.queries.PAGING_GUARANTEE) and was offered to every
subscriber joined at the time. Each round reads the settled rows after the position, once for
all subscribers, and moves the position to the last of them. A subscriber that joins at
position W, having sent everything up to its own cursor C, first reads (C, W] itself (a Span),
then takes what the feed offers after W: nothing is missed, and the seqs it already sent are
skipped, so nothing is sent twice.

A feed's round also asks, in the same statement, whether each row matches each distinct filter
expression of its subscribers (those compile to SQL only), so one read serves them all; the
rest of a selection (keys, types, time range) is matched in Python. A subscriber that joined
after a round's statement was built, so whose expression it lacks, is offered that round as a
Span. Items are buffered up to BufferLimits (items and their encoded bytes): past either, the
buffer is dropped, the subscriber leaves the feed and its stream ends RESOURCE_EXHAUSTED at the
next message it takes; the client resumes from the last resume token it received (every message
carries one), so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge

from streammesh.mesh.errors import ResourceExhausted

__all__ = ["BufferLimits", "BufferMetrics", "Entry", "Feed", "Span", "Subscriber"]

R = TypeVar("R")
T = TypeVar("T")

log = logging.getLogger(__name__)

_ROUND_SPACING = 0.05
"""Seconds from the end of a feed's rounds to the next start, at least."""


@dataclass(frozen=True, slots=True)
class BufferLimits:
    """What one live subscription may hold on the server before it is cut."""

    items: int = 10_000
    """Items (events, alerts, window results) waiting to be sent, at most."""
    bytes: int = 16 * 1024 * 1024
    """Their encoded size, at most."""


class BufferMetrics:
    """The replica's buffered items and bytes over all subscriptions, and the cuts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.items = Gauge(
            "streammesh_storage_subscription_buffered_items",
            "Items waiting in live subscriptions' buffers on this replica.",
            registry=registry,
        )
        self.bytes = Gauge(
            "streammesh_storage_subscription_buffered_bytes",
            "Encoded bytes of the items waiting in live subscriptions' buffers on this replica.",
            registry=registry,
        )
        self.cut = Counter(
            "streammesh_storage_subscriptions_cut",
            "Live subscriptions ended RESOURCE_EXHAUSTED past their buffer.",
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class Entry(Generic[R, T]):
    """One settled row as a feed read it: its seq, the row (for matching), its message, and
    that message encoded once as field 1 of a subscription response (every Subscribe*Response
    carries its items there), so that each subscriber's response is parsed from the joined
    encodings instead of copying every message into it."""

    seq: int
    row: R
    item: T
    framed: bytes

    @classmethod
    def of(cls, seq: int, row: R, item: T) -> Entry[R, T]:
        assert isinstance(item, Message)
        return cls(seq, row, item, _field_one(item.SerializeToString()))

    @property
    def size(self) -> int:
        return len(self.framed)


def _field_one(encoded: bytes) -> bytes:
    """`encoded` as a length-delimited field 1: its tag, its length as a varint, itself."""
    length, prefix = len(encoded), bytearray(b"\x0a")
    while length > 0x7F:
        prefix.append(length & 0x7F | 0x80)
        length >>= 7
    prefix.append(length)
    return bytes(prefix) + encoded


@dataclass(slots=True)
class Span:
    """Seqs in (after, through], all settled, for the subscriber to read itself."""

    after: int
    through: int


class Subscriber(Generic[R, T]):
    """One live subscription's buffer: `match` tells whether a feed's row is for it (None:
    the round cannot tell, as it lacks the subscriber's `filter`)."""

    def __init__(
        self,
        match: Callable[[R], bool | None],
        limits: BufferLimits,
        metrics: BufferMetrics,
        sent: int,
        filter: Hashable | None = None,
    ) -> None:
        self._match = match
        self.filter = filter
        """What the feed's statement must evaluate for this subscriber (None: nothing)."""
        self._limits = limits
        self._metrics = metrics
        self._queue: deque[Entry[R, T] | Span] = deque()
        self._items = 0
        self._bytes = 0
        self._ready = asyncio.Event()
        self._cut = False
        self.sent = sent
        """The seq at or below which every matching row was sent (or is not to be sent)."""
        self.through = sent
        """The seq at or below which every matching row is sent or in the buffer."""

    @property
    def position(self) -> int:
        """Where a resume token may point now: past every row offered, once none waits."""
        return self.sent if self._queue else max(self.sent, self.through)

    @property
    def buffered(self) -> tuple[int, int]:
        """Items and bytes in the buffer now."""
        return self._items, self._bytes

    def offer_span(self, after: int, through: int) -> None:
        """Rows in (after, through] are settled: read them (the join's catch-up, or a round)."""
        after = max(after, self.through)
        if through <= after:
            return
        last = self._queue[-1] if self._queue else None
        if isinstance(last, Span) and last.through == after:
            last.through = through
        else:
            self._queue.append(Span(after, through))
        self.through = through
        self._ready.set()

    def offer(self, entries: list[Entry[R, T]], after: int, through: int) -> bool:
        """A round's rows in (after, through]; False when the buffer overflowed (the
        subscriber is cut and must leave the feed)."""
        verdicts = [(entry, self._match(entry.row)) for entry in entries]
        if any(verdict is None for _, verdict in verdicts):
            self.offer_span(after, through)
            return True
        for entry, verdict in verdicts:
            if entry.seq <= self.through or not verdict:
                continue
            # One item always fits an empty buffer, however large (a message carries it).
            if self._items and (
                self._items + 1 > self._limits.items
                or self._bytes + entry.size > self._limits.bytes
            ):
                self._overflow()
                return False
            self._queue.append(entry)
            self._add(1, entry.size)
        self.through = max(self.through, through)
        if self._queue:
            self._ready.set()
        return True

    def _add(self, items: int, size: int) -> None:
        self._items += items
        self._bytes += size
        self._metrics.items.inc(items)
        self._metrics.bytes.inc(size)

    def _overflow(self) -> None:
        log.info(
            "a live subscription passed its buffer (%d items, %d bytes): cut",
            self._items,
            self._bytes,
        )
        self.release()
        self._cut = True
        self._metrics.cut.inc()
        self._ready.set()

    def release(self) -> None:
        """Drop the buffer (the subscription ends)."""
        self._queue.clear()
        self._add(-self._items, -self._bytes)

    async def take(self, most: int, budget: int, timeout: float) -> list[Entry[R, T]] | Span | None:
        """The next buffered items (at most `most`, within `budget` bytes, at least one) or the
        next Span; None when nothing came within `timeout` seconds. RESOURCE_EXHAUSTED once
        cut."""
        if not self._queue and not self._cut:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        if self._cut:
            raise ResourceExhausted(
                f"the subscription fell behind by more than {self._limits.items:,} items or"
                f" {self._limits.bytes:,} bytes; subscribe again with the last resume_token"
                " received to continue after it"
            )
        if not self._queue:  # woken with nothing (cannot happen, but a wait is no error)
            return None
        head = self._queue[0]
        if isinstance(head, Span):
            self._queue.popleft()
            return head
        taken: list[Entry[R, T]] = []
        while self._queue and len(taken) < most:
            entry = self._queue[0]
            if not isinstance(entry, Entry) or (taken and budget - entry.size < 0):
                break
            budget -= entry.size
            self._queue.popleft()
            taken.append(entry)
        self._add(-len(taken), -sum(entry.size for entry in taken))
        return taken


Read = Callable[[str, int, tuple[Any, ...]], Awaitable[tuple[list[Entry[Any, Any]], int, bool]]]
"""A feed's round: (tenant, after, its subscribers' filters) -> the settled rows after it in seq
order, the position after them, and whether more settled rows may be read at once."""


class Feed:
    """The shared tail of one tenant's rows of one table on this replica."""

    def __init__(
        self,
        tenant: str,
        read: Read,
        end: Callable[[str], Awaitable[int]],
        poll_seconds: float,
        on_empty: Callable[[Feed], None],
    ) -> None:
        self.tenant = tenant
        self._read = read
        self._end = end
        self._poll_seconds = poll_seconds
        self._on_empty = on_empty
        self._subscribers: set[Subscriber[Any, Any]] = set()
        self._wake = asyncio.Event()
        self._position: int | None = None
        self._joining = 0
        self._started = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"feed {tenant}")
        self.rounds = 0
        """Reads this feed ran (for the benchmark and the tests)."""

    def wake(self) -> None:
        """Rows may have been committed: read at once."""
        self._wake.set()

    async def join(self, subscriber: Subscriber[Any, Any]) -> None:
        """Add `subscriber` (sent everything up to subscriber.sent): it is offered the span up
        to the feed's position, then every round after it."""
        self._joining += 1
        try:
            await asyncio.shield(self._started)
        finally:
            self._joining -= 1
        assert self._position is not None  # read now: it may have moved on while waiting
        self._subscribers.add(subscriber)
        subscriber.offer_span(subscriber.sent, self._position)

    def leave(self, subscriber: Subscriber[Any, Any]) -> None:
        """Remove `subscriber`; the feed stops when it was the last."""
        self._subscribers.discard(subscriber)
        subscriber.release()
        if not self._subscribers and not self._joining:
            self._task.cancel()
            self._on_empty(self)

    async def _run(self) -> None:
        try:
            self._position = await self._end(self.tenant)
        except asyncio.CancelledError:
            self._started.cancel()
            raise
        except Exception as error:  # an outage: the joiners get it, a later one a new feed
            self._started.set_exception(error)
            self._on_empty(self)
            return
        self._started.set_result(self._position)
        failing = False
        while True:
            # The poll is the fallback: writers outside storage, a lost notification.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            self._wake.clear()
            try:
                await self._rounds()
                failing = False
                if not self._subscribers and not self._joining:
                    # Every subscriber was cut (buffers full): nobody to read for, though
                    # their handlers may not have left yet (a stalled client's handler waits).
                    self._on_empty(self)
                    return
                # Commits of the next 50 ms make one round: fewer, larger messages per
                # subscriber (a message costs more than its events) for at most that latency
                # (20 ms gave p99 592 ms, 50 ms 507 ms in scripts/bench_subscribe_live.py on
                # the shared machine, where storage is short of CPU).
                await asyncio.sleep(_ROUND_SPACING)
            except Exception as error:  # an outage: subscribers keep waiting, the poll retries
                if not failing:
                    log.warning("a live feed of tenant %s failed to read: %s", self.tenant, error)
                failing = True

    async def _rounds(self) -> None:
        while True:
            assert self._position is not None
            after = self._position
            filters = {s.filter for s in self._subscribers if s.filter is not None}
            entries, through, more = await self._read(self.tenant, after, tuple(filters))
            self.rounds += 1
            for subscriber in list(self._subscribers):
                if not subscriber.offer(entries, after, through):
                    self._subscribers.discard(subscriber)
            self._position = through
            if not (more and entries):
                return  # more without rows: unsettled ones, a commit will wake the feed
