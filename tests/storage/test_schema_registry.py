"""The schema registry in storage, with real Postgres over mTLS: versions from 1, idempotent
re-registration, modes (plain and transitive), every violation listed in the refusal, paging,
tenant separation, the change log ingest follows, and the peer policy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.storage.server import REGISTRY_SERVICE
from streammesh.api.common.v1 import schema_registry_pb2 as common
from streammesh.api.storage.v1 import schema_registry_pb2 as pb
from streammesh.api.storage.v1 import schema_registry_pb2_grpc as pb_grpc
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.mesh.errors import STATUS_DETAILS_KEY

if TYPE_CHECKING:
    Registry = pb_grpc.SchemaRegistryServiceAsyncStub
else:
    Registry = pb_grpc.SchemaRegistryServiceStub

ORDER_V1 = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "amount": {"type": "number"}},
    "required": ["id"],
}


@pytest.fixture
async def registry_for(
    pki_dir: Path, server: MeshServer
) -> AsyncIterator[Callable[[str], Registry]]:
    channels: list[grpc.aio.Channel] = []

    def open_stub(who: str) -> Registry:
        channel = create_channel(
            f"127.0.0.1:{server.port}",
            TlsMaterial.load(pki_dir, who),
            server_name="storage",
            config=service_config(REGISTRY_SERVICE, health_checked=False),
        )
        channels.append(channel)
        return cast(Registry, pb_grpc.SchemaRegistryServiceStub(channel))

    yield open_stub
    for channel in channels:
        await channel.close()


@pytest.fixture
def registry(registry_for: Callable[[str], Registry]) -> Registry:
    return registry_for("gateway")


async def register(
    registry: Registry, schema: Any, *, event_type: str = "order.created", tenant: str = "t1"
) -> pb.RegisterSchemaResponse:
    reply: pb.RegisterSchemaResponse = await registry.RegisterSchema(
        pb.RegisterSchemaRequest(
            tenant=tenant, event_type=event_type, schema_json=json.dumps(schema)
        )
    )
    return reply


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(cast(bytes, value))
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return [(v.field, v.description) for v in bad.field_violations]
    return []


def with_property(schema: dict[str, Any], name: str, sub: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "properties": {**schema["properties"], name: sub}}


async def test_versions_count_from_one_and_re_registering_returns_the_existing_version(
    registry: Registry,
) -> None:
    first = await register(registry, ORDER_V1)
    assert (first.schema.version, first.created) == (1, True)
    assert first.compatibility == common.COMPATIBILITY_MODE_BACKWARD
    assert first.schema.fingerprint.startswith("sha256:")
    # The same document with other key order and spacing is the same schema.
    reordered = json.dumps(dict(reversed(list(ORDER_V1.items()))), indent=4)
    again = await registry.RegisterSchema(
        pb.RegisterSchemaRequest(tenant="t1", event_type="order.created", schema_json=reordered)
    )
    assert (again.schema.version, again.created) == (1, False)
    assert again.schema.created_at == first.schema.created_at
    second = await register(registry, with_property(ORDER_V1, "note", {"type": "string"}))
    assert (second.schema.version, second.created) == (2, True)
    latest = await registry.GetSchema(pb.GetSchemaRequest(tenant="t1", event_type="order.created"))
    assert latest.schema.version == 2 and latest.subject.latest_version == 2
    assert json.loads(latest.schema.schema_json)["properties"]["note"] == {"type": "string"}
    old = await registry.GetSchema(
        pb.GetSchemaRequest(tenant="t1", event_type="order.created", version=1)
    )
    assert json.loads(old.schema.schema_json) == ORDER_V1


async def test_an_incompatible_version_is_refused_with_every_violation(registry: Registry) -> None:
    await register(registry, ORDER_V1)
    # Two breaking changes at once: a new required property and a narrowed type.
    breaking = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "amount": {"type": "integer"},
            "currency": {"type": "string"},
        },
        "required": ["id", "currency"],
    }
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await register(registry, breaking)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BACKWARD" in (refused.value.details() or "")
    violations = field_violations(refused.value)
    rules = {description.split(":", 1)[0] for _, description in violations}
    assert len(violations) >= 2, violations
    assert any("required" in rule for rule in rules), rules
    assert any("type" in rule for rule in rules), rules
    assert all(name.startswith("schema_json#") for name, _ in violations)
    # The same through CheckCompatibility, as data, and nothing was registered.
    check = await registry.CheckCompatibility(
        pb.CheckCompatibilityRequest(
            tenant="t1", event_type="order.created", schema_json=json.dumps(breaking)
        )
    )
    assert not check.compatible
    assert list(check.checked_versions) == [1]
    assert len(check.violations) == len(violations)
    assert {v.instance_path for v in check.violations} >= {"/amount", "/currency"}
    assert all(v.direction == common.COMPATIBILITY_DIRECTION_BACKWARD for v in check.violations)
    listed = await registry.ListSchemaVersions(
        pb.ListSchemaVersionsRequest(tenant="t1", event_type="order.created")
    )
    assert [v.version for v in listed.versions] == [1]


async def test_a_document_that_is_not_a_schema_names_each_problem(registry: Registry) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "strin"}, "b": {"minimum": "x"}}}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await register(registry, bad)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {name for name, _ in field_violations(refused.value)}
    assert {"schema_json#/properties/a/type", "schema_json#/properties/b/minimum"} <= fields
    with pytest.raises(grpc.aio.AioRpcError) as not_json:
        await registry.RegisterSchema(
            pb.RegisterSchemaRequest(tenant="t1", event_type="x", schema_json="{")
        )
    assert not_json.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_modes_forward_none_and_transitive(registry: Registry) -> None:
    # FORWARD: old readers must read new data; adding a required property is fine, removing
    # one that old readers require is not.
    await registry.SetCompatibility(
        pb.SetCompatibilityRequest(
            tenant="t1", event_type="f", compatibility=common.COMPATIBILITY_MODE_FORWARD
        )
    )
    await register(registry, ORDER_V1, event_type="f")
    required = {**with_property(ORDER_V1, "c", {"type": "string"}), "required": ["id", "c"]}
    assert (await register(registry, required, event_type="f")).schema.version == 2
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await register(registry, {**ORDER_V1, "required": []}, event_type="f")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Transitive: v1 a:string; v2 drops a (closed models make removal visible); v3 adds a back
    # as integer. Each step is BACKWARD compatible with the one before, v3 is not with v1.
    closed_v1 = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "additionalProperties": False,
    }
    closed_v2 = {"type": "object", "properties": {}, "additionalProperties": True}
    closed_v3 = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for mode, event_type in (
        (common.COMPATIBILITY_MODE_BACKWARD, "plain"),
        (common.COMPATIBILITY_MODE_BACKWARD_TRANSITIVE, "transitive"),
    ):
        await registry.SetCompatibility(
            pb.SetCompatibilityRequest(tenant="t1", event_type=event_type, compatibility=mode)
        )
        await register(registry, closed_v1, event_type=event_type)
        await register(registry, closed_v2, event_type=event_type)
    assert (await register(registry, closed_v3, event_type="plain")).schema.version == 3
    with pytest.raises(grpc.aio.AioRpcError) as transitive:
        await register(registry, closed_v3, event_type="transitive")
    assert "version 1" in " ".join(d for _, d in field_violations(transitive.value))
    check = await registry.CheckCompatibility(
        pb.CheckCompatibilityRequest(
            tenant="t1", event_type="transitive", schema_json=json.dumps(closed_v3)
        )
    )
    assert list(check.checked_versions) == [2, 1]
    assert {v.version for v in check.violations} == {1}

    # NONE accepts anything valid; the mode asked for in a check overrides the subject's.
    await registry.SetCompatibility(
        pb.SetCompatibilityRequest(
            tenant="t1", event_type="transitive", compatibility=common.COMPATIBILITY_MODE_NONE
        )
    )
    assert (await register(registry, closed_v3, event_type="transitive")).schema.version == 3
    strict = await registry.CheckCompatibility(
        pb.CheckCompatibilityRequest(
            tenant="t1",
            event_type="transitive",
            schema_json=json.dumps({"type": "string"}),
            compatibility=common.COMPATIBILITY_MODE_FULL,
        )
    )
    assert strict.compatibility == common.COMPATIBILITY_MODE_FULL and not strict.compatible


async def test_tenants_are_separate_and_listings_page(registry: Registry) -> None:
    for index in range(5):
        await register(registry, ORDER_V1, event_type=f"type.{index}")
    await register(registry, {"type": "string"}, event_type="type.0", tenant="t2")
    other = await registry.GetSchema(pb.GetSchemaRequest(tenant="t2", event_type="type.0"))
    assert json.loads(other.schema.schema_json) == {"type": "string"}
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await registry.GetSchema(pb.GetSchemaRequest(tenant="t2", event_type="type.1"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    seen: list[str] = []
    token = ""
    while True:
        page = await registry.ListSubjects(
            pb.ListSubjectsRequest(tenant="t1", page_size=2, page_token=token)
        )
        seen += [s.event_type for s in page.subjects]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"type.{i}" for i in range(5)]
    t2 = await registry.ListSubjects(pb.ListSubjectsRequest(tenant="t2"))
    assert [s.event_type for s in t2.subjects] == ["type.0"]
    first = await registry.ListSubjects(pb.ListSubjectsRequest(tenant="t1", page_size=2))
    with pytest.raises(grpc.aio.AioRpcError) as replayed:
        await registry.ListSubjects(
            pb.ListSubjectsRequest(tenant="t2", page_token=first.next_page_token)
        )
    assert replayed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_registrations_of_one_type_get_distinct_versions(
    registry: Registry,
) -> None:
    await registry.SetCompatibility(
        pb.SetCompatibilityRequest(
            tenant="t1", event_type="race", compatibility=common.COMPATIBILITY_MODE_NONE
        )
    )
    schemas = [{"type": "object", "properties": {f"p{i}": {"type": "string"}}} for i in range(6)]
    replies = await asyncio.gather(*(register(registry, s, event_type="race") for s in schemas))
    assert sorted(r.schema.version for r in replies) == [1, 2, 3, 4, 5, 6]


async def test_policy_and_the_change_log(registry: Registry, registry_for: Any) -> None:
    ingest: Registry = registry_for("ingest")
    start = await ingest.ListSchemaChanges(pb.ListSchemaChangesRequest())
    assert (list(start.changes), start.head_change_id) == ([], 0)
    policy = await ingest.GetSchemaPolicy(pb.GetSchemaPolicyRequest(tenant="t1"))
    assert policy.unknown_types == common.UNKNOWN_TYPE_POLICY_ACCEPT
    await registry.SetSchemaPolicy(
        pb.SetSchemaPolicyRequest(tenant="t1", unknown_types=common.UNKNOWN_TYPE_POLICY_REFUSE)
    )
    await register(registry, ORDER_V1)
    await register(registry, ORDER_V1)  # idempotent: no change recorded
    # A follower gets what changed since the last id it saw.
    everything = await ingest.ListSchemaChanges(pb.ListSchemaChangesRequest())
    assert [(c.change_id, c.event_type) for c in everything.changes] == [
        (1, ""),
        (2, "order.created"),
    ]
    assert everything.head_change_id == 2
    page = await ingest.ListSchemaChanges(pb.ListSchemaChangesRequest(after_change_id=1))
    assert [(c.tenant, c.event_type) for c in page.changes] == [("t1", "order.created")]
    assert not page.more
    await registry.SetCompatibility(
        pb.SetCompatibilityRequest(
            tenant="t2", event_type="x", compatibility=common.COMPATIBILITY_MODE_FULL
        )
    )
    limited = await ingest.ListSchemaChanges(
        pb.ListSchemaChangesRequest(after_change_id=1, limit=1)
    )
    assert len(limited.changes) == 1 and limited.more and limited.head_change_id == 3
    policy = await ingest.GetSchemaPolicy(pb.GetSchemaPolicyRequest(tenant="t1"))
    assert policy.unknown_types == common.UNKNOWN_TYPE_POLICY_REFUSE
    with pytest.raises(grpc.aio.AioRpcError) as unspecified:
        await registry.SetSchemaPolicy(pb.SetSchemaPolicyRequest(tenant="t1"))
    assert unspecified.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_peer_policy_default_deny(registry_for: Any) -> None:
    ingest: Registry = registry_for("ingest")
    processor: Registry = registry_for("processor")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await register(ingest, ORDER_V1)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as reader:
        await processor.GetSchema(pb.GetSchemaRequest(tenant="t1", event_type="x"))
    assert reader.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_tenant_is_required(registry: Registry) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await register(registry, ORDER_V1, tenant="")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused.value)[0][0] == "tenant"
