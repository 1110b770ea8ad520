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
from streammesh.mesh import TlsMaterial, create_channel, service_config

__all__ = ["REGISTRY_SERVICE", "Change", "RegistryClient", "RegistryUnavailable", "StoredSchema"]

REGISTRY_SERVICE = "streammesh.storage.v1.SchemaRegistryService"


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
    """Calls storage's SchemaRegistryService over mTLS as `ingest` (reads only, retried)."""

    def __init__(self, target: str, tls: TlsMaterial, *, timeout_seconds: float) -> None:
        self._channel = create_channel(
            target,
            tls,
            server_name="storage",
            config=service_config(
                REGISTRY_SERVICE,
                retry_methods=["GetSchema", "GetSchemaPolicy", "ListSchemaChanges"],
            ),
        )
        # Per call rather than in the service config: there, a timeout of 1 s or less made
        # every call fail at once with DEADLINE_EXCEEDED (grpcio 1.85, seen in tests).
        self._timeout = timeout_seconds
        self._stub = pb_grpc.SchemaRegistryServiceStub(self._channel)

    async def schema(self, tenant: str, event_type: str, version: int) -> StoredSchema | None:
        """The version (0: the latest), or None when the type has no schema or no such version."""
        try:
            reply = await self._stub.GetSchema(
                pb.GetSchemaRequest(tenant=tenant, event_type=event_type, version=version),
                timeout=self._timeout,
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
            reply = await self._stub.GetSchemaPolicy(
                pb.GetSchemaPolicyRequest(tenant=tenant), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise RegistryUnavailable(f"{error.code().name}: {error.details()}") from error
        return bool(reply.unknown_types == common.UNKNOWN_TYPE_POLICY_REFUSE)

    async def changes(self, after: int, *, limit: int) -> tuple[list[Change], int, bool]:
        """Changes after `after`, the head change id, and whether more follow."""
        try:
            reply = await self._stub.ListSchemaChanges(
                pb.ListSchemaChangesRequest(after_change_id=after, limit=limit),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as error:
            raise RegistryUnavailable(f"{error.code().name}: {error.details()}") from error
        changes = [Change(c.change_id, c.tenant, c.event_type) for c in reply.changes]
        return changes, reply.head_change_id, reply.more

    async def close(self) -> None:
        await self._channel.close()
