"""SubscribeEvents: a live tail of one tenant's matching events, in seq order, resumable.

A tail is QueryEvents paging that never ends. It first pages what is stored (EventQueries.page,
so up to the paging horizon: services.storage.queries.PAGING_GUARANTEE), sending each page with
a resume token (a page token of the same query and principal, so a QueryEvents next_page_token
resumes a subscription and the other way round). Once nothing settled is left it sends the
`current` marker and joins the replica's shared feed of the tenant's events
(services.storage.live_feed, woken by storage's writes and NOTIFY: services.storage.table_watch),
which reads new settled rows once for every subscription of the tenant and offers each the ones
that match. The guarantee that makes paging to the end return every committed event once makes
the tail deliver every event once: a client that reconnects with the last resume token it
received gets exactly the events after it, or OUT_OF_RANGE when the retention removed events
after it (services.storage.retention).

Bounds: a principal has at most `max_per_principal` tails on a replica, a replica at most
`max_per_replica` (RESOURCE_EXHAUSTED past either). A subscriber that stops reading holds its
handler at a `yield` (grpc.aio writes under HTTP/2 flow control) while the feed goes on: what
the feed offers it is buffered up to `buffer` (items and bytes), past which the stream ends
RESOURCE_EXHAUSTED, naming the resume token as the way on. A deadline or a cancel cancels the
handler, which leaves the feed; a gauge counts the tails.

`follow` is the loop every tail shares (SubscribeAlerts, SubscribeWindowResults:
services.storage.output_subscriptions). With `shared_feeds` off each tail polls its own query
every `poll_seconds` instead, as storage did before the feeds (kept for the comparison in
scripts/bench_subscribe_poll.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Gauge

from services.storage.live_feed import BufferLimits, BufferMetrics, Entry, Feed, Span, Subscriber
from services.storage.queries import Selection
from services.storage.query_api import QueryApi
from services.storage.rows import stored_event
from services.storage.store import StoredRow
from services.storage.subscription_leases import SubscriptionLeases
from services.storage.table_watch import TableWatch
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.errors import InvalidArgument, ResourceExhausted
from streammesh.mesh.paging import Principal

__all__ = [
    "EventSubscriptions",
    "Live",
    "Round",
    "TailAdmissions",
    "TailSettings",
    "follow",
    "resume_refusal",
]

T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class TailSettings:
    """How tails read and how many may run."""

    poll_seconds: float = 0.5
    """A shared feed reads this often without a wake-up (with shared_feeds off: each tail's
    pause between rounds once nothing settled is left)."""
    heartbeat_seconds: float = 15.0
    """An idle stream sends a message without events this often (proxies close silent ones)."""
    batch_events: int = 500
    """Events read per round, at most (a message may hold fewer: the message size budget)."""
    message_bytes: int = 3_600_000
    """Encoded items in one message, at most (one item always goes)."""
    max_per_principal: int = 8
    """Concurrent tails of one principal on one replica."""
    max_per_replica: int = 256
    """Concurrent tails on one replica."""
    buffer: BufferLimits = field(default_factory=BufferLimits)
    """What a live tail may hold for a subscriber that does not read."""
    shared_feeds: bool = True
    """Live tails take new rows from the replica's shared feeds (else each polls on its own)."""


class TailAdmissions:
    """The tails running on this replica within TailSettings' limits (events, alerts and
    window results count against the same ones): per principal over every replica with
    `leases` (services.storage.subscription_leases), else per principal on this replica; and
    their gauge."""

    def __init__(
        self,
        settings: TailSettings,
        registry: CollectorRegistry | None = None,
        leases: SubscriptionLeases | None = None,
    ) -> None:
        self.settings = settings
        self._leases = leases
        self._by_principal: Counter[tuple[str, str]] = Counter()
        self._gauge = Gauge(
            "streammesh_storage_tails",
            "SubscribeEvents and SubscribeAlerts tails running on this replica.",
            registry=registry if registry is not None else CollectorRegistry(),
        )

    @property
    def active(self) -> int:
        """Tails running now."""
        return sum(self._by_principal.values())

    @contextlib.asynccontextmanager
    async def admitted(self, principal: Principal) -> AsyncIterator[None]:
        """Count one tail of `principal` while inside; RESOURCE_EXHAUSTED past a limit."""
        key = (principal.tenant, principal.subject)
        limits = self.settings
        if self.active >= limits.max_per_replica:
            raise ResourceExhausted(
                "this storage replica serves its maximum of subscriptions; retry shortly",
                retry_after_seconds=1.0,
            )
        if self._leases is None and self._by_principal[key] >= limits.max_per_principal:
            raise ResourceExhausted(
                f"at most {limits.max_per_principal} concurrent subscriptions per user;"
                " close one first",
                retry_after_seconds=1.0,
            )
        self._by_principal[key] += 1  # before the lease's await: the replica limit holds
        self._gauge.inc()
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self._leases is not None:
                    await stack.enter_async_context(
                        self._leases.held(principal, limits.max_per_principal)
                    )
                yield
        finally:
            self._by_principal[key] -= 1
            if not self._by_principal[key]:
                del self._by_principal[key]
            self._gauge.dec()


@dataclass(frozen=True, slots=True)
class Round(Generic[T]):
    """What one read of a tail found: the items to send with their seqs (in seq order), the
    cursor after them, and whether more may be read at once (settled rows left, or the message
    budget was hit)."""

    items: list[tuple[int, T]]
    after: int
    more: bool


@dataclass(frozen=True, slots=True)
class Live(Generic[R, T]):
    """How a tail joins its shared feed: the feed of its table and tenant, which of the feed's
    rows it takes, and what the feed's statement must evaluate for it (None: nothing)."""

    feed: Callable[[], Feed]
    match: Callable[[R], bool | None]
    metrics: BufferMetrics
    filter: Hashable | None = None


async def follow(
    read: Callable[[int], Awaitable[Round[T]]],
    message: Callable[[list[T], str, bool], M],
    token: Callable[[int], str],
    after: int,
    settings: TailSettings,
    live: Live[Any, T] | None,
) -> AsyncIterator[M]:
    """The rounds of a tail from `after`: each round's items as `message(items, token,
    current=False)`; once a round finds nothing more settled, one `current` message; then the
    live tail from the shared feed (`live`; None: rounds every poll_seconds), with a heartbeat
    (no items) every heartbeat_seconds of silence."""
    loop = asyncio.get_running_loop()
    current = False
    sent = loop.time()
    while True:
        found = await read(after)
        after = found.after
        if found.items:
            yield message([item for _, item in found.items], token(after), False)
            sent = loop.time()
            if found.more:
                continue  # read on at once: more rows may be settled already
        if not current and not found.more:
            current = True
            yield message([], token(after), True)
            if live is not None:
                break
            sent = loop.time()
        elif loop.time() - sent >= settings.heartbeat_seconds:
            yield message([], token(after), False)
            sent = loop.time()
        await asyncio.sleep(settings.poll_seconds)
    assert live is not None
    async for response in _live_tail(read, message, token, after, settings, live):
        yield response


async def _live_tail(
    read: Callable[[int], Awaitable[Round[T]]],
    message: Callable[[list[T], str, bool], M],
    token: Callable[[int], str],
    after: int,
    settings: TailSettings,
    live: Live[Any, T],
) -> AsyncIterator[M]:
    loop = asyncio.get_running_loop()
    subscriber: Subscriber[Any, T] = Subscriber(
        live.match, settings.buffer, live.metrics, after, live.filter
    )
    feed = live.feed()
    sent = loop.time()
    try:
        await feed.join(subscriber)
        while True:
            wait = max(0.0, settings.heartbeat_seconds - (loop.time() - sent))
            got = await subscriber.take(settings.batch_events, settings.message_bytes, wait)
            if got is None:
                yield message([], token(subscriber.position), False)
            elif isinstance(got, Span):
                async for items, position in _span(read, got):
                    subscriber.sent = position
                    yield message(items, token(position), False)
                subscriber.sent = max(subscriber.sent, got.through)
                continue  # the span's end rides on the next message
            else:
                subscriber.sent = got[-1].seq
                response = message([], token(subscriber.position), False)
                response.MergeFromString(b"".join(entry.framed for entry in got))
                yield response
            sent = loop.time()
    finally:
        feed.leave(subscriber)


async def _span(
    read: Callable[[int], Awaitable[Round[T]]], span: Span
) -> AsyncIterator[tuple[list[T], int]]:
    """The tail's own rounds over (span.after, span.through] (all settled), and the cursor
    after each."""
    after = span.after
    while after < span.through:
        found = await read(after)
        items = [(seq, item) for seq, item in found.items if seq <= span.through]
        if items:
            after = items[-1][0]
            yield [item for _, item in items], after
        if len(items) < len(found.items) or not found.more:
            return  # past the span's end, or no row left in it
        if not items:
            # The horizon is conservative: a transaction that began before these rows were
            # stored, and took its lock on the table only after the feed read them, holds them
            # back now although it cannot write below them. It ends soon: ask again.
            await asyncio.sleep(_UNSETTLED_PAUSE)


_UNSETTLED_PAUSE = 0.01
"""Seconds between reads of a span whose settled rows an older writer holds back."""


def resume_refusal(error: InvalidArgument) -> InvalidArgument:
    """A page-token refusal named after the subscription's field, resume_token."""
    return InvalidArgument(
        error.message.replace("page_token", "resume_token"),
        field_violations=[("resume_token", reason) for _, reason in error.field_violations],
    )


EventRow = tuple[StoredRow, dict[Hashable, bool]]
"""A feed's event row, and whether it matches each filter expression of the feed's round."""


def event_filter(selection: Selection) -> Hashable | None:
    """What a feed's statement evaluates for the selection: its filter expression (keyed by
    its repr as well, so that literals Python counts equal, 1 and true, stay apart)."""
    predicate = selection.predicate
    return None if predicate is None else (repr(predicate), predicate)


def event_match(selection: Selection) -> Callable[[EventRow], bool | None]:
    """Whether a feed's row matches the selection (its keys, types and time range here, its
    filter expression by the round's verdict; None when the round lacks it)."""
    keys, types = frozenset(selection.keys), frozenset(selection.types)
    start, end = selection.start_time, selection.end_time
    expression = event_filter(selection)

    def match(row: EventRow) -> bool | None:
        stored, verdicts = row
        at = (stored.event_time, stored.event_time_nanos)
        if (
            (keys and stored.key not in keys)
            or (types and stored.type not in types)
            or (start is not None and at < start)
            or (end is not None and at >= end)
        ):
            return False
        return True if expression is None else verdicts.get(expression)

    return match


class EventSubscriptions:
    """The SubscribeEvents handler's logic over the query API and its queries."""

    def __init__(
        self,
        api: QueryApi,
        admissions: TailAdmissions,
        watch: TableWatch,
        metrics: BufferMetrics,
    ) -> None:
        self._api = api
        self._queries = api.queries
        self._admissions = admissions
        self._watch = watch
        self._metrics = metrics

    async def _feed_round(
        self, tenant: str, after: int, filters: tuple[Any, ...]
    ) -> tuple[list[Entry[EventRow, event_pb2.StoredEvent]], int, bool]:
        page, verdicts = await self._queries.feed_page(
            tenant,
            [predicate for _, predicate in filters],
            after_seq=after,
            limit=self._admissions.settings.batch_events,
        )
        entries = []
        for row, matched in zip(page.rows, verdicts, strict=True):
            event = stored_event(row)[0]
            row_verdicts: dict[Hashable, bool] = dict(zip(filters, matched, strict=True))
            entries.append(Entry.of(row.seq, (row, row_verdicts), event))
        return entries, (page.rows[-1].seq if page.rows else after), page.more

    async def _feed_start(self, tenant: str) -> int:
        """Where a new feed of `tenant` starts: the settled end (its generation is the
        subscribers' business, not the feed's)."""
        end, _ = await self._queries.settled_end(tenant)
        return end

    def _feed(self, tenant: str) -> Feed:
        return self._watch.feed("events", tenant, self._feed_round, self._feed_start)

    async def subscribe(
        self, request: storage_pb2.SubscribeEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[storage_pb2.SubscribeEventsResponse]:
        """Matching events stored before (unless start_at_end), one `current` marker, then the
        live tail with heartbeats; every message carries the resume token."""
        selection = await self._api.resolve(
            request.tenant, request.filter, request.filter_expression, context
        )
        principal = Principal(selection.tenant, request.principal)
        try:
            cursor = self._api.position(
                request.resume_token, selection, request.filter_expression, principal
            )
        except InvalidArgument as error:
            raise resume_refusal(error) from None
        settings = self._admissions.settings
        async with self._admissions.admitted(principal):
            after = cursor.after_seq
            # The retention generation of the position (services.storage.retention): the
            # token's, then each round's; None until a position was handed out.
            generation = cursor.generation
            if not request.resume_token and request.start_at_end:
                after, generation = await self._queries.settled_end(selection.tenant)

            async def read(after: int) -> Round[event_pb2.StoredEvent]:
                nonlocal generation
                page = await self._queries.page(
                    selection,
                    after_seq=after,
                    limit=settings.batch_events,
                    generation=generation,
                    position_field="resume_token",
                )
                generation = page.generation
                events = self._api.render(page.rows)
                last = events[-1].sequence if events else after
                items = [(event.sequence, event) for event in events]
                return Round(items, last, page.more or len(events) < len(page.rows))

            def token(seq: int) -> str:
                # follow() asks for the token of a round right after reading it.
                return cursor.token(seq, generation or 0)

            def message(
                events: list[event_pb2.StoredEvent], token: str, current: bool
            ) -> storage_pb2.SubscribeEventsResponse:
                return storage_pb2.SubscribeEventsResponse(
                    events=events, resume_token=token, current=current
                )

            live: Live[EventRow, event_pb2.StoredEvent] | None = None
            if settings.shared_feeds:
                live = Live(
                    lambda: self._feed(selection.tenant),
                    event_match(selection),
                    self._metrics,
                    event_filter(selection),
                )
            async for response in follow(read, message, token, after, settings, live):
                yield response
