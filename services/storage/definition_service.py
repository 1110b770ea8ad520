"""streammesh.storage.v1.DefinitionService handlers: rule and window definitions (see
`definitions.py` for the request rules, `definition_store.py` for the SQL) and the engines'
outputs (`engine_outputs.py`, `engine_output_store.py`).

A definition the engine could not run is INVALID_ARGUMENT with one field violation naming the
bad part (`definition.steps[1].within`), as the engine's parser reports it. An id the tenant
does not have is NOT_FOUND, whether or not another tenant has it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.storage import definitions, engine_outputs, output_queries, registry
from services.storage.definition_store import DefinitionRow, DefinitionStore, NewVersion
from services.storage.engine_output_store import EngineOutputStore
from services.storage.output_listings import OutputListings
from services.storage.output_subscriptions import OutputSubscriptions
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.api.storage.v1 import definitions_pb2_grpc as pb_grpc
from streammesh.mesh.errors import AlreadyExists, InvalidArgument, NotFound

__all__ = ["DefinitionServicer"]


def _not_found(kind: str, definition_id: str) -> NotFound:
    return NotFound(f"no {kind} {definition_id!r} in your tenant")


class DefinitionServicer(pb_grpc.DefinitionServiceServicer):
    def __init__(
        self,
        store: DefinitionStore,
        outputs: EngineOutputStore,
        tails: OutputSubscriptions,
        listings: OutputListings,
    ) -> None:
        self._store = store
        self._outputs = outputs
        self._tails = tails
        self._listings = listings

    async def CreateDefinition(
        self, request: pb.CreateDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateDefinitionResponse:
        tenant = registry.checked_tenant(request.tenant)
        kind = definitions.kind_name(request.kind)
        document = definitions.parse_definition_json(request.definition_json)
        given = document.get("id")
        if not isinstance(given, str) or not given:
            raise InvalidArgument(
                "definition.id: required, a non-empty string",
                field_violations=[("definition.id", "required, a non-empty string")],
            )
        definition_id = definitions.checked_id(given, "definition.id")

        def build(latest: DefinitionRow | None) -> NewVersion:
            if latest is not None:
                raise AlreadyExists(
                    f"{kind} {definition_id!r} exists (version {latest.version}); update it instead"
                )
            return definitions.next_version(kind, tenant, definition_id, document, None)

        row, _ = await self._store.write(
            tenant, kind, definition_id, created_by=request.created_by, build=build
        )
        return pb.CreateDefinitionResponse(definition=definitions.definition_message(row))

    async def UpdateDefinition(
        self, request: pb.UpdateDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateDefinitionResponse:
        tenant = registry.checked_tenant(request.tenant)
        kind = definitions.kind_name(request.kind)
        definition_id = definitions.checked_id(request.id)
        document = definitions.parse_definition_json(request.definition_json)

        def build(latest: DefinitionRow | None) -> NewVersion:
            if latest is None:
                raise _not_found(kind, definition_id)
            return definitions.next_version(kind, tenant, definition_id, document, latest)

        row, _ = await self._store.write(
            tenant, kind, definition_id, created_by=request.created_by, build=build
        )
        return pb.UpdateDefinitionResponse(definition=definitions.definition_message(row))

    async def SetDefinitionEnabled(
        self, request: pb.SetDefinitionEnabledRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetDefinitionEnabledResponse:
        tenant = registry.checked_tenant(request.tenant)
        kind = definitions.kind_name(request.kind)
        definition_id = definitions.checked_id(request.id)

        def build(latest: DefinitionRow | None) -> NewVersion | None:
            if latest is None:
                raise _not_found(kind, definition_id)
            if latest.enabled == request.enabled:
                return None
            document = {k: v for k, v in latest.definition.items() if k != "version"}
            return definitions.next_version(
                kind, tenant, definition_id, document, latest, enabled=request.enabled
            )

        row, changed = await self._store.write(
            tenant, kind, definition_id, created_by=request.created_by, build=build
        )
        return pb.SetDefinitionEnabledResponse(
            definition=definitions.definition_message(row), changed=changed
        )

    async def GetDefinition(
        self, request: pb.GetDefinitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDefinitionResponse:
        tenant = registry.checked_tenant(request.tenant)
        kind = definitions.kind_name(request.kind)
        definition_id = definitions.checked_id(request.id)
        row, latest = await self._store.get(tenant, kind, definition_id, request.version)
        if latest == 0:
            raise _not_found(kind, definition_id)
        if row is None:
            raise NotFound(
                f"{kind} {definition_id!r} has no version {request.version} "
                f"(versions 1 to {latest})"
            )
        return pb.GetDefinitionResponse(
            definition=definitions.definition_message(row), latest_version=latest
        )

    async def ListDefinitions(
        self, request: pb.ListDefinitionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDefinitionsResponse:
        tenant = registry.checked_tenant(request.tenant)
        kind = definitions.kind_name(request.kind)
        size = registry.page_size(request.page_size)
        scope = ("definitions", tenant, kind)
        after = ""
        if request.page_token:
            after = registry.decode_page_token(request.page_token, str, *scope)
        rows = await self._store.page_latest(tenant, kind, after=after, limit=size + 1)
        response = pb.ListDefinitionsResponse(
            definitions=[definitions.definition_message(row) for row in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = registry.encode_page_token(
                rows[size - 1].definition_id, *scope
            )
        return response

    async def ListDefinitionChanges(
        self, request: pb.ListDefinitionChangesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDefinitionChangesResponse:
        limit = registry.changes_limit(request.limit)
        rows, head = await self._store.changes(after=request.after_change_id, limit=limit)
        return pb.ListDefinitionChangesResponse(
            changes=[
                pb.DefinitionChange(
                    change_id=r.change_id,
                    tenant=r.tenant,
                    kind=definitions.kind_value(r.kind),
                    id=r.definition_id,
                    version=r.version,
                )
                for r in rows
            ],
            head_change_id=head,
            more=bool(rows) and rows[-1].change_id < head,
        )

    async def StoreEngineOutputs(
        self, request: pb.StoreEngineOutputsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StoreEngineOutputsResponse:
        outputs = engine_outputs.rows(request)
        checkpoint = engine_outputs.checkpoint(request)
        fence = engine_outputs.fence(request)
        alerts, results, late, saved = await self._outputs.store(outputs, checkpoint, fence)
        return pb.StoreEngineOutputsResponse(
            alerts_written=alerts,
            window_results_written=results,
            late_events_written=late,
            checkpoint_saved=saved,
        )

    async def LoadEngineCheckpoint(
        self, request: pb.LoadEngineCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadEngineCheckpointResponse:
        stream, partition = engine_outputs.checkpoint_place(request.stream, request.partition, "")
        if request.lease_epoch > engine_outputs.MAX_EPOCH:
            raise InvalidArgument(
                f"lease_epoch: at most {engine_outputs.MAX_EPOCH}",
                field_violations=[("lease_epoch", f"at most {engine_outputs.MAX_EPOCH}")],
            )
        saved = await self._outputs.load_checkpoint(
            stream, partition, lease_epoch=request.lease_epoch
        )
        if saved is None:
            return pb.LoadEngineCheckpointResponse(found=False)
        return pb.LoadEngineCheckpointResponse(
            found=True, checkpoint=engine_outputs.checkpoint_message(saved)
        )

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        equal = {"rule_id": request.rule_id} if request.rule_id else {}
        page = await self._listings.page(
            output_queries.ALERTS, request, equal, output_queries.alert_message
        )
        return pb.ListAlertsResponse(alerts=page.items, next_page_token=page.next_page_token)

    async def SubscribeAlerts(
        self, request: pb.SubscribeAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeAlertsResponse]:
        """A tenant's alerts as they are recorded (services.storage.output_subscriptions)."""
        async for response in self._tails.alerts(request):
            yield response

    async def SubscribeWindowResults(
        self, request: pb.SubscribeWindowResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeWindowResultsResponse]:
        """A tenant's window results as they are recorded."""
        async for response in self._tails.window_results(request):
            yield response

    async def ListWindowResults(
        self, request: pb.ListWindowResultsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWindowResultsResponse:
        equal = {}
        if request.window_id:
            equal["window_id"] = definitions.checked_id(request.window_id, "window_id")
        page = await self._listings.page(
            output_queries.WINDOW_RESULTS, request, equal, output_queries.result_message
        )
        return pb.ListWindowResultsResponse(
            window_results=page.items, next_page_token=page.next_page_token
        )

    async def ListLateEvents(
        self, request: pb.ListLateEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLateEventsResponse:
        page = await self._listings.page(
            output_queries.LATE_EVENTS, request, {}, output_queries.late_event_message
        )
        return pb.ListLateEventsResponse(
            late_events=page.items, next_page_token=page.next_page_token
        )
