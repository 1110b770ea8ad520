"""The StorageService handlers: validate requests, translate protobuf <-> store rows, page.

Anything the database would refuse (NUL characters, out-of-range timestamps or partitions,
oversized strings) is refused here as INVALID_ARGUMENT with field violations, so bad input never
surfaces as INTERNAL. The processor dead-letters a batch refused this way and retries on
UNAVAILABLE, which the store raises for database outages.
"""

from __future__ import annotations

import logging

import grpc

from services.storage import dead_letters
from services.storage.batch import (
    Limits,
    Violations,
    batch_columns,
    checked_time,
    queued_columns,
    row_partitions,
)
from services.storage.dead_letter_store import DeadLetterStore
from services.storage.paging import (
    dead_letter_scope,
    decode_page_token,
    decode_position,
    encode_page_token,
    encode_position,
)
from services.storage.rows import stored_event
from services.storage.store import EventQuery, EventStore
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.mesh.errors import InvalidArgument, NotFound
from streammesh.mesh.metrics.pipeline import StorageMetrics

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Limits", "StorageServicer"]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
"""Page size when the request leaves it 0."""
MAX_PAGE_SIZE = 1000
"""Largest page a client may ask for."""
# Framing of one repeated element (tag + length varint), counted against the response budget.
_ELEMENT_OVERHEAD = 8


def _query(event_filter: event_pb2.EventFilter, limits: Limits) -> EventQuery:
    problems = Violations()
    if len(event_filter.keys) > limits.max_filter_keys:
        problems.add("filter.keys", f"more than {limits.max_filter_keys} keys")
    else:
        for index, key in enumerate(event_filter.keys):
            problems.text(f"filter.keys[{index}]", key, limits.max_text_chars)
    problems.text("filter.type", event_filter.type, limits.max_text_chars)
    start = end = None
    if event_filter.HasField("start_time"):
        start = checked_time(event_filter.start_time, "filter.start_time", problems)
    if event_filter.HasField("end_time"):
        end = checked_time(event_filter.end_time, "filter.end_time", problems)
    if start is not None and end is not None and end < start:
        problems.add("filter.end_time", "before start_time")
    problems.raise_if_any()
    return EventQuery(
        keys=tuple(sorted(set(event_filter.keys))),
        type=event_filter.type,
        start_time=start,
        end_time=end,
    )


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """Handlers of streammesh.storage.v1.StorageService over an EventStore."""

    def __init__(
        self,
        store: EventStore,
        limits: Limits,
        dead: DeadLetterStore,
        metrics: StorageMetrics | None = None,
    ) -> None:
        self._store = store
        self._limits = limits
        self._dead = dead
        self._metrics = metrics or StorageMetrics()

    def _stored(self, batch: int, inserted: int) -> storage_pb2.StoreEventsResponse:
        self._metrics.events_stored.inc(inserted)
        self._metrics.events_duplicate.inc(batch - inserted)
        return storage_pb2.StoreEventsResponse(inserted=inserted, duplicates=batch - inserted)

    async def StoreEvents(
        self, request: storage_pb2.StoreEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.StoreEventsResponse:
        """Store the batch in one transaction; ids already stored count as duplicates."""
        if request.HasField("columns"):
            if request.HasField("batch"):
                raise InvalidArgument(
                    "set one of batch and columns, not both",
                    field_violations=[("batch", "set together with columns")],
                )
            columns = queued_columns(request.columns, self._limits)
            partitions = row_partitions(request.columns)
            if partitions is not None:  # the entries of several partitions (a processor's round)
                inserted = await self._store.insert_partitions(columns, partitions=partitions)
                return self._stored(len(columns), inserted)
            partition = request.columns.partition
        else:
            columns = batch_columns(request.batch, self._limits)
            partition = request.batch.partition
        inserted = await self._store.insert_batch(columns, partition=partition)
        return self._stored(len(columns), inserted)

    async def QueryEvents(
        self, request: storage_pb2.QueryEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.QueryEventsResponse:
        """One page of matching events in seq order, and the token for the next page."""
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be 0..{MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})",
                field_violations=[("page_size", f"{request.page_size} is out of range")],
            )
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        query = _query(request.filter, self._limits)
        after_seq = 0
        if request.page_token:
            try:
                after_seq = decode_page_token(request.page_token, query)
            except ValueError as error:
                raise InvalidArgument(
                    f"invalid page_token: {error}", field_violations=[("page_token", str(error))]
                ) from error
        # One row beyond the page tells whether another page exists without a second query.
        rows = await self._store.query(query, after_seq=after_seq, limit=page_size + 1)
        response = storage_pb2.QueryEventsResponse()
        budget = self._limits.max_response_bytes
        odd: list[str] = []
        for row in rows[:page_size]:
            stored, problems = stored_event(row)
            budget -= stored.ByteSize() + _ELEMENT_OVERHEAD
            if budget < 0 and response.events:
                break
            response.events.append(stored)
            if problems:
                odd.append(f"{row.id!r} (seq {row.seq}): {'; '.join(problems)}")
        if odd:
            log.warning("rendered %d stored row(s) the API cannot carry: %s", len(odd), odd[:5])
        if len(rows) > len(response.events):
            response.next_page_token = encode_page_token(response.events[-1].sequence, query)
        return response

    async def CountEvents(
        self, request: storage_pb2.CountEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.CountEventsResponse:
        """How many stored events match the filter."""
        query = _query(request.filter, self._limits)
        return storage_pb2.CountEventsResponse(count=await self._store.count(query))

    async def StoreDeadLetter(
        self, request: storage_pb2.StoreDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.StoreDeadLetterResponse:
        """Record an entry the processor gave up on; a repeat returns the first record."""
        row, created = await self._dead.insert(dead_letters.new_dead_letter(request))
        if created:
            self._metrics.dead_letters.inc()
        return storage_pb2.StoreDeadLetterResponse(
            dead_letter=dead_letters.dead_letter_message(row), created=created
        )

    async def ListDeadLetters(
        self, request: storage_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.ListDeadLettersResponse:
        """One page of dead letters, newest first, and the token for the next page."""
        query, page_size = dead_letters.list_query(request)
        scope = dead_letter_scope(query.partition, query.replayed)
        before_id = None
        if request.page_token:
            try:
                before_id = decode_position(request.page_token, scope)
            except ValueError as error:
                raise InvalidArgument(
                    f"invalid page_token: {error}", field_violations=[("page_token", str(error))]
                ) from error
        rows = await self._dead.page(query, before_id=before_id, limit=page_size + 1)
        response = storage_pb2.ListDeadLettersResponse(
            dead_letters=[dead_letters.dead_letter_message(row) for row in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_page_token = encode_position(rows[page_size - 1].id, scope)
        return response

    async def GetDeadLetter(
        self, request: storage_pb2.GetDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.GetDeadLetterResponse:
        """One dead letter with its events (or the raw fields of an undecodable entry)."""
        found = await self._dead.get(request.id)
        if found is None:
            raise NotFound(f"no dead letter {request.id}")
        return dead_letters.get_response(*found)

    async def MarkDeadLetterReplayed(
        self,
        request: storage_pb2.MarkDeadLetterReplayedRequest,
        context: grpc.aio.ServicerContext,
    ) -> storage_pb2.MarkDeadLetterReplayedResponse:
        """Count a replay of the dead letter, by whom and when."""
        by = dead_letters.replayed_by(request)
        row = await self._dead.mark_replayed(request.id, by=by)
        if row is None:
            raise NotFound(f"no dead letter {request.id}")
        return storage_pb2.MarkDeadLetterReplayedResponse(
            dead_letter=dead_letters.dead_letter_message(row)
        )
