"""The StorageService handlers: validate requests, translate protobuf <-> store rows, page
(the query calls are services.storage.query_api's).

Anything the database would refuse (NUL characters, out-of-range timestamps or partitions,
oversized strings) is refused here as INVALID_ARGUMENT with field violations, so bad input never
surfaces as INTERNAL. The processor dead-letters a batch refused this way and retries on
UNAVAILABLE, which the store raises for database outages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.storage import dead_letters
from services.storage.batch import Limits, batch_columns, queued_columns, row_partitions
from services.storage.dead_letter_store import DeadLetterStore
from services.storage.event_fences import check_fences
from services.storage.paging import dead_letter_scope, decode_position, encode_position
from services.storage.query_api import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, QueryApi
from services.storage.store import EventStore
from services.storage.subscriptions import EventSubscriptions
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.mesh.errors import InvalidArgument, NotFound
from streammesh.mesh.metrics.pipeline import StorageMetrics
from streammesh.mesh.tenancy import DEFAULT_TENANT, caller_tenant

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Limits", "StorageServicer"]


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """Handlers of streammesh.storage.v1.StorageService over an EventStore."""

    def __init__(
        self,
        store: EventStore,
        limits: Limits,
        dead: DeadLetterStore,
        queries: QueryApi,
        *,
        trust_domain: str,
        metrics: StorageMetrics | None = None,
        subscriptions: EventSubscriptions,
    ) -> None:
        self._store = store
        self._limits = limits
        self._dead = dead
        self._queries = queries
        self._trust_domain = trust_domain
        self._metrics = metrics or StorageMetrics()
        self._subscriptions = subscriptions

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The tenant the gateway names for the caller (x-streammesh-tenant), which every
        dead-letter read is scoped to; "default" for a call that names none (an operator's own
        tools)."""
        return caller_tenant(context, trust_domain=self._trust_domain) or DEFAULT_TENANT

    def _stored(self, batch: int, inserted: int) -> storage_pb2.StoreEventsResponse:
        self._metrics.events_stored.inc(inserted)
        self._metrics.events_duplicate.inc(batch - inserted)
        return storage_pb2.StoreEventsResponse(inserted=inserted, duplicates=batch - inserted)

    async def StoreEvents(
        self, request: storage_pb2.StoreEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.StoreEventsResponse:
        """Store the batch in one transaction; ids already stored count as duplicates. With
        fences, FAILED_PRECONDITION (nothing written) for a stale lease epoch (event_fences)."""
        fences = check_fences(request.fences)
        if request.HasField("columns"):
            if request.HasField("batch"):
                raise InvalidArgument(
                    "set one of batch and columns, not both",
                    field_violations=[("batch", "set together with columns")],
                )
            columns = queued_columns(request.columns, self._limits)
            partitions = row_partitions(request.columns)
            if partitions is not None:  # the entries of several partitions (a processor's round)
                inserted = await self._store.insert_partitions(
                    columns, partitions=partitions, fences=fences
                )
                return self._stored(len(columns), inserted)
            partition = request.columns.partition
        else:
            columns = batch_columns(request.batch, self._limits)
            partition = request.batch.partition
        inserted = await self._store.insert_batch(columns, partition=partition, fences=fences)
        return self._stored(len(columns), inserted)

    async def QueryEvents(
        self, request: storage_pb2.QueryEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.QueryEventsResponse:
        """One page of matching events in seq order, and the token for the next page."""
        return await self._queries.query_events(request, context)

    async def SubscribeEvents(
        self, request: storage_pb2.SubscribeEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[storage_pb2.SubscribeEventsResponse]:
        """Matching events as they are stored, resumable (services.storage.subscriptions)."""
        async for response in self._subscriptions.subscribe(request, context):
            yield response

    async def CountEvents(
        self, request: storage_pb2.CountEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.CountEventsResponse:
        """How many stored events match the filter."""
        return await self._queries.count_events(request, context)

    async def AggregateEvents(
        self, request: storage_pb2.AggregateEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.AggregateEventsResponse:
        """Count, and sum/min/max/avg of a numeric payload field, per key or type."""
        return await self._queries.aggregate_events(request, context)

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
        query, page_size = dead_letters.list_query(request, self._tenant(context))
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
        found = await self._dead.get(self._tenant(context), request.id)
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
        row = await self._dead.mark_replayed(self._tenant(context), request.id, by=by)
        if row is None:
            raise NotFound(f"no dead letter {request.id}")
        return storage_pb2.MarkDeadLetterReplayedResponse(
            dead_letter=dead_letters.dead_letter_message(row)
        )
