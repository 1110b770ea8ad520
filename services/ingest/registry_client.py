"""Ingest's view of storage's schema registry: the latest or a named version of a type's schema,
a tenant's unknown-type policy, and the change log. Every failure that is not an answer (storage
down, a deadline, a refusal that should not happen) is `RegistryUnavailable`: the cache then
keeps what it has and the caller applies the outage rules."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc

from streammesh.api.common.v1 import schema_registry_pb2 as common
from streammesh.api.storage.v1 import schema_registry_pb2 as pb
from streammesh.api.storage.v1 import schema_registry_pb2_grpc as pb_grpc
from streammesh.mesh.client import (
    DEFAULT_TLS_RELOAD_SECONDS,
    MeshClient,
    MeshClientConfig,
    TlsFiles,
    parse_targets,
)

__all__ = ["REGISTRY", "Change", "RegistryClient", "RegistryUnavailable", "StoredSchema"]

REGISTRY = pb.DESCRIPTOR.services_by_name["SchemaRegistryService"]
"""The service called; its protos say which methods are retried (all ingest calls are reads)."""


class RegistryUnavailable(Exception):
    """Storage could not answer; what is cached stays in use."""


@dataclass(frozen=True)
class StoredSchema:
    version: int
    schema: Any
    latest_version: int


@dataclass(frozen=True)
class Change:
    change_id: int
    tenant: str
    event_type: str


class RegistryClient:
    """Calls storage's SchemaRegistryService over mTLS as `ingest`, through one mesh client:
    balanced over storage's replicas (`target` may name several), each call with a deadline of
    `timeout_seconds`, retried as the protos declare (GetSchema, GetSchemaPolicy and
    ListSchemaChanges have no side effects)."""

    def __init__(
        self,
        target: str,
        tls: TlsFiles,
        *,
        timeout_seconds: float,
        tls_reload_seconds: float | None = DEFAULT_TLS_RELOAD_SECONDS,
    ) -> None:
        self._client = MeshClient(
            MeshClientConfig(
                server_name="storage",
                targets=parse_targets(target),
                tls=tls,
                services=(REGISTRY,),
                timeout_seconds=timeout_seconds,
                tls_reload_seconds=tls_reload_seconds,
            )
        )
        self._stub = self._client.stub(pb_grpc.SchemaRegistryServiceStub)

    async def schema(self, tenant: str, event_type: str, version: int) -> StoredSchema | None:
        """The version (0: the latest), or None when the type has no schema or no such version."""
        try:
            reply = await self._stub.GetSchema(
                pb.GetSchemaRequest(tenant=tenant, event_type=event_type, version=version),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise RegistryUnavailable(f"{error.code().name}: {error.details()}") from error
        return StoredSchema(
            version=reply.schema.version,
            schema=json.loads(reply.schema.schema_json),
            latest_version=reply.subject.latest_version,
        )

    async def refuses_unknown_types(self, tenant: str) -> bool:
        try:
            reply = await self._stub.GetSchemaPolicy(pb.GetSchemaPolicyRequest(tenant=tenant))
        except grpc.aio.AioRpcError as error:
            raise RegistryUnavailable(f"{error.code().name}: {error.details()}") from error
        return bool(reply.unknown_types == common.UNKNOWN_TYPE_POLICY_REFUSE)

    async def changes(self, after: int, *, limit: int) -> tuple[list[Change], int, bool]:
        """Changes after `after`, the head change id, and whether more follow."""
        try:
            reply = await self._stub.ListSchemaChanges(
                pb.ListSchemaChangesRequest(after_change_id=after, limit=limit),
            )
        except grpc.aio.AioRpcError as error:
            raise RegistryUnavailable(f"{error.code().name}: {error.details()}") from error
        changes = [Change(c.change_id, c.tenant, c.event_type) for c in reply.changes]
        return changes, reply.head_change_id, reply.more

    async def close(self) -> None:
        await self._client.close()
