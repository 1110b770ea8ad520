"""streammesh.storage.v1.SchemaRegistryService handlers: validate, check, store (see
`registry.py` for the rules and `registry_store.py` for the SQL).

Refusals are INVALID_ARGUMENT with field violations: for a document that is not a schema the
registry keeps, and for an incompatible version. INVALID_ARGUMENT rather than
FAILED_PRECONDITION for the latter: the document is the argument at fault and the one thing
the client changes (the subject's history cannot be changed and its mode rarely is), the same
request will never succeed, and clients already read BadRequest field violations from
INVALID_ARGUMENT everywhere in this API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from services.storage import registry
from services.storage.registry_store import RegistryStore, VersionRow
from services.storage.schemas import CompatibilityMode
from streammesh.api.common.v1 import schema_registry_pb2 as common
from streammesh.api.storage.v1 import schema_registry_pb2 as pb
from streammesh.api.storage.v1 import schema_registry_pb2_grpc as pb_grpc
from streammesh.mesh.errors import InvalidArgument, NotFound

__all__ = ["SchemaRegistryServicer"]

_POLICY_PREFIX = "UNKNOWN_TYPE_POLICY_"


def _policy_value(name: str) -> common.UnknownTypePolicy.ValueType:
    return common.UnknownTypePolicy.Value(_POLICY_PREFIX + name)


class SchemaRegistryServicer(pb_grpc.SchemaRegistryServiceServicer):
    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    async def RegisterSchema(
        self, request: pb.RegisterSchemaRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterSchemaResponse:
        tenant = registry.checked_tenant(request.tenant)
        event_type = registry.checked_event_type(request.event_type)
        document = registry.parse_document(request.schema_json)

        async def decide(mode: str, previous: Sequence[VersionRow]) -> None:
            # The check can take a second of CPU on a large schema history: off the event
            # loop, so the storage replica keeps serving StoreEvents meanwhile.
            report = await asyncio.to_thread(
                registry.compatibility_report, document, CompatibilityMode(mode), previous
            )
            if not report.compatible:
                raise registry.incompatible(report)

        row, created, mode = await self._store.register(
            tenant,
            event_type,
            schema_text=document.text,
            fingerprint=document.fingerprint,
            decide=decide,
        )
        return pb.RegisterSchemaResponse(
            schema=registry.version_message(row),
            created=created,
            compatibility=registry.mode_value(mode),
        )

    async def CheckCompatibility(
        self, request: pb.CheckCompatibilityRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCompatibilityResponse:
        tenant = registry.checked_tenant(request.tenant)
        event_type = registry.checked_event_type(request.event_type)
        asked = registry.checked_mode(request.compatibility, "compatibility", required=False)
        document = registry.parse_document(request.schema_json)
        subject = await self._store.subject(tenant, event_type)
        versions = await self._store.versions(tenant, event_type) if subject else []
        mode = asked or (CompatibilityMode(subject.compatibility) if subject else None)
        report = await asyncio.to_thread(
            registry.compatibility_report, document, mode or CompatibilityMode.BACKWARD, versions
        )
        same = [v.version for v in versions if v.fingerprint == document.fingerprint]
        return pb.CheckCompatibilityResponse(
            # The document already registered is what RegisterSchema returns, whatever the mode.
            compatible=report.compatible or bool(same),
            compatibility=registry.mode_value(report.mode),
            checked_versions=report.checked_versions,
            violations=[registry.violation_message(v) for v in report.violations],
            registered_version=same[0] if same else 0,
        )

    async def GetSchema(
        self, request: pb.GetSchemaRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSchemaResponse:
        tenant = registry.checked_tenant(request.tenant)
        event_type = registry.checked_event_type(request.event_type)
        subject = await self._store.subject(tenant, event_type)
        if subject is None or subject.latest_version == 0:
            raise NotFound(f"no schema is registered for event type {event_type!r}")
        row = await self._store.version(tenant, event_type, request.version)
        if row is None:
            raise NotFound(
                f"event type {event_type!r} has no version {request.version} "
                f"(versions 1 to {subject.latest_version})"
            )
        return pb.GetSchemaResponse(
            schema=registry.version_message(row), subject=registry.subject_message(subject)
        )

    async def ListSubjects(
        self, request: pb.ListSubjectsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSubjectsResponse:
        tenant = registry.checked_tenant(request.tenant)
        size = registry.page_size(request.page_size)
        after = ""
        if request.page_token:
            after = registry.decode_page_token(request.page_token, str, "subjects", tenant)
        rows = await self._store.page_subjects(tenant, after=after, limit=size + 1)
        response = pb.ListSubjectsResponse(
            subjects=[registry.subject_message(row) for row in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = registry.encode_page_token(
                rows[size - 1].event_type, "subjects", tenant
            )
        return response

    async def ListSchemaVersions(
        self, request: pb.ListSchemaVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSchemaVersionsResponse:
        tenant = registry.checked_tenant(request.tenant)
        event_type = registry.checked_event_type(request.event_type)
        size = registry.page_size(request.page_size)
        scope = ("versions", tenant, event_type)
        after = 0
        if request.page_token:
            after = registry.decode_page_token(request.page_token, int, *scope)
        elif await self._store.subject(tenant, event_type) is None:
            raise NotFound(f"no schema is registered for event type {event_type!r}")
        rows = await self._store.page_versions(tenant, event_type, after=after, limit=size + 1)
        response = pb.ListSchemaVersionsResponse(
            versions=[registry.version_message(row) for row in rows[:size]]
        )
        if len(rows) > size:
            response.next_page_token = registry.encode_page_token(rows[size - 1].version, *scope)
        return response

    async def SetCompatibility(
        self, request: pb.SetCompatibilityRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetCompatibilityResponse:
        tenant = registry.checked_tenant(request.tenant)
        event_type = registry.checked_event_type(request.event_type)
        mode = registry.checked_mode(request.compatibility, "compatibility", required=True)
        assert mode is not None  # required=True raised otherwise
        row = await self._store.set_compatibility(tenant, event_type, mode.value)
        return pb.SetCompatibilityResponse(subject=registry.subject_message(row))

    async def GetSchemaPolicy(
        self, request: pb.GetSchemaPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSchemaPolicyResponse:
        tenant = registry.checked_tenant(request.tenant)
        policy = await self._store.policy(tenant)
        return pb.GetSchemaPolicyResponse(unknown_types=_policy_value(policy))

    async def SetSchemaPolicy(
        self, request: pb.SetSchemaPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetSchemaPolicyResponse:
        tenant = registry.checked_tenant(request.tenant)
        value = request.unknown_types
        if value not in (common.UNKNOWN_TYPE_POLICY_ACCEPT, common.UNKNOWN_TYPE_POLICY_REFUSE):
            raise InvalidArgument(
                "unknown_types must be ACCEPT or REFUSE",
                field_violations=[("unknown_types", f"{value} is not ACCEPT or REFUSE")],
            )
        name = common.UnknownTypePolicy.Name(value).removeprefix(_POLICY_PREFIX)
        stored = await self._store.set_policy(tenant, name)
        return pb.SetSchemaPolicyResponse(unknown_types=_policy_value(stored))

    async def ListSchemaChanges(
        self, request: pb.ListSchemaChangesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSchemaChangesResponse:
        limit = registry.changes_limit(request.limit)
        rows, head = await self._store.changes(after=request.after_change_id, limit=limit)
        return pb.ListSchemaChangesResponse(
            changes=[
                pb.SchemaChange(change_id=r.change_id, tenant=r.tenant, event_type=r.event_type)
                for r in rows
            ],
            head_change_id=head,
            more=bool(rows) and rows[-1].change_id < head,
        )
