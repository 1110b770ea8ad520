"""SubscribeEvents: a live tail of one tenant's matching events, in seq order, resumable.

A tail is QueryEvents paging that never ends: each round reads the next page after the cursor
(EventQueries.page, so up to the paging horizon: services.storage.queries.PAGING_GUARANTEE),
sends it with a resume token (a page token of the same query and principal, so a QueryEvents
next_page_token resumes a subscription and the other way round), and, once nothing settled is
left, sleeps `poll_seconds` before the next round. The guarantee that makes paging to the end
return every committed event once makes the tail deliver every event once: a client that
reconnects with the last resume token it received gets exactly the events after it, or
OUT_OF_RANGE when the retention removed events after it (services.storage.retention; also in
mid-tail, for a tail that fell that far behind).

Why polling and not LISTEN/NOTIFY: storage may run as several replicas, so a wake-up must come
from the database, and a NOTIFY on every insert (a trigger on `events`) takes a database-wide
lock at each commit, serialising all writers' commits for a latency gain of one poll interval.
An idle poll costs two short statements on a pooled connection (the horizon and an empty index
range); the README gives the measured figure. The horizon also has to be polled anyway: a row
waits for an older writer to end, of which no notification tells.

Bounds: a principal has at most `max_per_principal` tails on a replica, a replica at most
`max_per_replica` (RESOURCE_EXHAUSTED past either). A subscriber that stops reading is not
buffered for: a handler's `yield` waits until grpc.aio has written the message, which waits on
HTTP/2 flow control, so a stalled reader stops its tail's polling (tested). A deadline or a
cancel cancels the handler, which ends the tail where it waits; a gauge counts the tails.

`follow` is the loop both tails share (SubscribeAlerts: services.storage.alert_subscriptions).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Gauge

from services.storage.query_api import QueryApi
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.errors import InvalidArgument, ResourceExhausted
from streammesh.mesh.paging import Principal

__all__ = [
    "EventSubscriptions",
    "Round",
    "TailAdmissions",
    "TailSettings",
    "follow",
    "resume_refusal",
]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class TailSettings:
    """How tails poll and how many may run."""

    poll_seconds: float = 0.2
    """Pause between rounds once nothing settled is left (the added latency, at most)."""
    heartbeat_seconds: float = 15.0
    """An idle stream sends a message without events this often (proxies close silent ones)."""
    batch_events: int = 500
    """Events read per round, at most (a message may hold fewer: the message size budget)."""
    max_per_principal: int = 8
    """Concurrent tails of one principal on one replica."""
    max_per_replica: int = 256
    """Concurrent tails on one replica."""


class TailAdmissions:
    """The tails running on this replica, by principal, within TailSettings' limits (events and
    alerts count against the same ones), and their gauge."""

    def __init__(self, settings: TailSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
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

    @contextlib.contextmanager
    def admitted(self, principal: Principal) -> Iterator[None]:
        """Count one tail of `principal` while inside; RESOURCE_EXHAUSTED past a limit."""
        key = (principal.tenant, principal.subject)
        limits = self.settings
        if self._by_principal[key] >= limits.max_per_principal:
            raise ResourceExhausted(
                f"at most {limits.max_per_principal} concurrent subscriptions per user;"
                " close one first",
                retry_after_seconds=1.0,
            )
        if self.active >= limits.max_per_replica:
            raise ResourceExhausted(
                "this storage replica serves its maximum of subscriptions; retry shortly",
                retry_after_seconds=1.0,
            )
        self._by_principal[key] += 1
        self._gauge.inc()
        try:
            yield
        finally:
            self._by_principal[key] -= 1
            if not self._by_principal[key]:
                del self._by_principal[key]
            self._gauge.dec()


@dataclass(frozen=True, slots=True)
class Round(Generic[T]):
    """What one read of a tail found: the items to send (in seq order), the cursor after them,
    and whether more may be read at once (settled rows left, or the message budget was hit)."""

    items: list[T]
    after: int
    more: bool


async def follow(
    read: Callable[[int], Awaitable[Round[T]]],
    message: Callable[[list[T], str, bool], R],
    token: Callable[[int], str],
    after: int,
    settings: TailSettings,
) -> AsyncIterator[R]:
    """The rounds of a tail from `after`: each round's items as `message(items, token,
    current=False)`; once a round finds nothing more settled, one `current` message, and after
    that a heartbeat (no items) every heartbeat_seconds; a pause of poll_seconds between rounds
    that leave nothing to read at once."""
    loop = asyncio.get_running_loop()
    current = False
    sent = loop.time()
    while True:
        found = await read(after)
        after = found.after
        if found.items:
            yield message(found.items, token(after), False)
            sent = loop.time()
            if found.more:
                continue  # read on at once: more rows may be settled already
        if not current and not found.more:
            current = True
            yield message([], token(after), True)
            sent = loop.time()
        elif loop.time() - sent >= settings.heartbeat_seconds:
            yield message([], token(after), False)
            sent = loop.time()
        await asyncio.sleep(settings.poll_seconds)


def resume_refusal(error: InvalidArgument) -> InvalidArgument:
    """A page-token refusal named after the subscription's field, resume_token."""
    return InvalidArgument(
        error.message.replace("page_token", "resume_token"),
        field_violations=[("resume_token", reason) for _, reason in error.field_violations],
    )


class EventSubscriptions:
    """The SubscribeEvents handler's logic over the query API and its queries."""

    def __init__(self, api: QueryApi, admissions: TailAdmissions) -> None:
        self._api = api
        self._queries = api.queries
        self._admissions = admissions

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
        with self._admissions.admitted(principal):
            after = cursor.after_seq
            # The retention generation of the position (services.storage.retention): the
            # token's, then each round's; None until a position was handed out.
            generation = cursor.generation
            if not request.resume_token and request.start_at_end:
                after, generation = await self._queries.settled_end(selection.tenant)
            batch = self._admissions.settings.batch_events

            async def read(after: int) -> Round[event_pb2.StoredEvent]:
                nonlocal generation
                page = await self._queries.page(
                    selection,
                    after_seq=after,
                    limit=batch,
                    generation=generation,
                    position_field="resume_token",
                )
                generation = page.generation
                events = self._api.render(page.rows)
                last = events[-1].sequence if events else after
                return Round(events, last, page.more or len(events) < len(page.rows))

            def token(seq: int) -> str:
                # follow() asks for the token of a round right after reading it.
                return cursor.token(seq, generation or 0)

            def message(
                events: list[event_pb2.StoredEvent], token: str, current: bool
            ) -> storage_pb2.SubscribeEventsResponse:
                return storage_pb2.SubscribeEventsResponse(
                    events=events, resume_token=token, current=current
                )

            async for response in follow(read, message, token, after, self._admissions.settings):
                yield response
