"""SubscribeEvents: a live tail of one tenant's matching events, in seq order, resumable.

A tail is QueryEvents paging that never ends: each round reads the next page after the cursor
(EventQueries.page, so up to the paging horizon: services.storage.queries.PAGING_GUARANTEE),
sends it with a resume token (a page token of the same query and principal, so a QueryEvents
next_page_token resumes a subscription and the other way round), and, once nothing settled is
left, sleeps `poll_seconds` before the next round. The guarantee that makes paging to the end
return every committed event once makes the tail deliver every event once: a client that
reconnects with the last resume token it received gets exactly the events after it.

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
cancel cancels the handler, which ends the tail where it waits; `active` counts the tails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Gauge

from services.storage.queries import Selection
from services.storage.query_api import Cursor, QueryApi
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.errors import InvalidArgument, ResourceExhausted
from streammesh.mesh.paging import Principal

__all__ = ["EventSubscriptions", "TailSettings"]


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


class EventSubscriptions:
    """The SubscribeEvents handler's logic over the query API and its queries."""

    def __init__(
        self,
        api: QueryApi,
        settings: TailSettings,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._api = api
        self._queries = api.queries
        self._settings = settings
        self._by_principal: Counter[tuple[str, str]] = Counter()
        self._gauge = Gauge(
            "streammesh_storage_event_tails",
            "SubscribeEvents tails running on this replica.",
            registry=registry if registry is not None else CollectorRegistry(),
        )

    @property
    def active(self) -> int:
        """Tails running now."""
        return sum(self._by_principal.values())

    @contextlib.contextmanager
    def _admitted(self, principal: Principal) -> Iterator[None]:
        key = (principal.tenant, principal.subject)
        limits = self._settings
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
        except InvalidArgument as error:  # named after this API's field
            raise InvalidArgument(
                error.message.replace("page_token", "resume_token"),
                field_violations=[("resume_token", reason) for _, reason in error.field_violations],
            ) from None
        with self._admitted(principal):
            after = cursor.after_seq
            if not request.resume_token and request.start_at_end:
                after = await self._queries.settled_end(selection.tenant)
            async for response in self._tail(selection, cursor, after):
                yield response

    async def _tail(
        self, selection: Selection, cursor: Cursor, after: int
    ) -> AsyncIterator[storage_pb2.SubscribeEventsResponse]:
        loop = asyncio.get_running_loop()
        settings = self._settings
        current = False
        sent = loop.time()
        while True:
            page = await self._queries.page(selection, after_seq=after, limit=settings.batch_events)
            events = self._api.render(page.rows)
            if events:
                after = events[-1].sequence
                yield storage_pb2.SubscribeEventsResponse(
                    events=events, resume_token=cursor.token(after)
                )
                sent = loop.time()
                if page.more or len(events) < len(page.rows):
                    continue  # read on at once: more rows may be settled already
            if not current and not page.more:
                current = True
                yield storage_pb2.SubscribeEventsResponse(
                    resume_token=cursor.token(after), current=True
                )
                sent = loop.time()
            elif loop.time() - sent >= settings.heartbeat_seconds:
                yield storage_pb2.SubscribeEventsResponse(resume_token=cursor.token(after))
                sent = loop.time()
            await asyncio.sleep(settings.poll_seconds)
