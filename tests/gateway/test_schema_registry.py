"""The schema registry through the real gateway over TLS, with real auth tokens, real storage
(Postgres) and a real ingest following storage's change log: register, check, refuse with
every violation, read; events checked per event (index and reason in the acknowledgement, the
rest of the batch queued); how long a new version takes to reach a running ingest; the policy
for types without a schema."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from streammesh.api.common.v1 import event_pb2
from streammesh.api.common.v1 import schema_registry_pb2 as common
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.api.gateway.v1 import schema_registry_pb2 as pb
from streammesh.api.gateway.v1 import schema_registry_pb2_grpc as pb_grpc
from streammesh.entries import entry_body
from streammesh.mesh.errors import STATUS_DETAILS_KEY
from tests.conftest import xrange_entries
from tests.gateway.conftest import Stack

if TYPE_CHECKING:
    Registry = pb_grpc.SchemaRegistryServiceAsyncStub
else:
    Registry = pb_grpc.SchemaRegistryServiceStub

PAYMENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "amount": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD"]},
        "paid": {"type": "boolean"},
        "note": {"type": "string"},
    },
    "required": ["id", "amount"],
}
PROPAGATION_BOUND_SECONDS = 10.0
"""Generous: the design target is ~0.5 s (poll interval) + a call; the figure is printed."""


@pytest.fixture
def registry(stack: Stack) -> Registry:
    return cast(Registry, pb_grpc.SchemaRegistryServiceStub(stack.gateway_channel))


def as_(stack: Stack, who: str) -> dict[str, Any]:
    return {"metadata": stack.people[who].bearer(), "timeout": 10}


def violations_of(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            for detail in status_pb2.Status.FromString(cast(bytes, value)).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return [(v.field, v.description) for v in bad.field_violations]
    return []


async def register(stack: Stack, registry: Registry, event_type: str, schema: Any) -> int:
    reply = await registry.RegisterSchema(
        pb.RegisterSchemaRequest(event_type=event_type, schema_json=json.dumps(schema)),
        **as_(stack, "schema-admin"),
    )
    return int(reply.schema.version)


def event(event_type: str, payload: Any, **fields: Any) -> event_pb2.Event:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return event_pb2.Event(key="k", type=event_type, payload=body, **fields)


async def publish(stack: Stack, events: list[event_pb2.Event]) -> gateway_pb2.PublishBatchResponse:
    reply: gateway_pb2.PublishBatchResponse = await stack.gateway.PublishBatch(
        gateway_pb2.PublishBatchRequest(events=events), **as_(stack, "producer")
    )
    return reply


async def queued_ids(stack: Stack) -> set[str]:
    found = set()
    for partition in range(stack.layout.partitions):
        for _, fields in await xrange_entries(stack.redis, stack.layout.stream(partition)):
            found |= {q.event.id for q in entry_body(fields).batch().events}
    return found


async def test_register_check_refuse_and_read(stack: Stack, registry: Registry) -> None:
    assert await register(stack, registry, "gw.order", PAYMENT) == 1
    assert await register(stack, registry, "gw.order", PAYMENT) == 1  # idempotent
    breaking = {
        **PAYMENT,
        "properties": {**PAYMENT["properties"], "amount": {"type": "integer"}},
        "required": ["id", "amount", "paid"],
    }
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await register(stack, registry, "gw.order", breaking)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listed = violations_of(refused.value)
    # Every violation crosses the gateway, each by path and rule.
    assert len(listed) >= 2, listed
    assert all(field.startswith("schema_json#") for field, _ in listed), listed
    descriptions = " ".join(description for _, description in listed)
    assert "instance /amount" in descriptions and "instance /paid" in descriptions, listed
    # A producer's CI asks first: the same violations as data, nothing registered.
    check = await registry.CheckCompatibility(
        pb.CheckCompatibilityRequest(event_type="gw.order", schema_json=json.dumps(breaking)),
        **as_(stack, "producer"),
    )
    assert not check.compatible and len(check.violations) == len(listed)
    assert {v.instance_path for v in check.violations} >= {"/amount", "/paid"}
    shown = await registry.GetSchema(
        pb.GetSchemaRequest(event_type="gw.order"), **as_(stack, "analyst")
    )
    assert shown.schema.version == 1 and json.loads(shown.schema.schema_json) == PAYMENT
    assert shown.subject.compatibility == common.COMPATIBILITY_MODE_BACKWARD
    subjects = await registry.ListSubjects(pb.ListSubjectsRequest(), **as_(stack, "analyst"))
    assert "gw.order" in [s.event_type for s in subjects.subjects]
    versions = await registry.ListSchemaVersions(
        pb.ListSchemaVersionsRequest(event_type="gw.order"), **as_(stack, "producer")
    )
    assert [v.version for v in versions.versions] == [1]
    with pytest.raises(grpc.aio.AioRpcError) as producer_registers:
        await registry.RegisterSchema(
            pb.RegisterSchemaRequest(event_type="gw.order", schema_json="{}"),
            **as_(stack, "producer"),
        )
    assert producer_registers.value.code() == grpc.StatusCode.PERMISSION_DENIED
    mode = await registry.SetCompatibility(
        pb.SetCompatibilityRequest(
            event_type="gw.order", compatibility=common.COMPATIBILITY_MODE_FULL_TRANSITIVE
        ),
        **as_(stack, "schema-admin"),
    )
    assert mode.subject.compatibility == common.COMPATIBILITY_MODE_FULL_TRANSITIVE


async def test_each_event_is_checked_and_refused_alone(stack: Stack, registry: Registry) -> None:
    await register(stack, registry, "gw.payment", PAYMENT)
    good = {"id": "p1", "amount": 12.5, "currency": "EUR", "paid": True, "note": "x"}
    batch = [
        event("gw.payment", good),
        event("gw.payment", {**good, "amount": "12"}),  # wrong type
        event("gw.payment", {"id": "p3", "amount": 1}),
        event("gw.payment", b"not json", content_type="text/plain"),  # not JSON: not checked
        event("gw.payment", good, schema_version=7),  # no such version
        event("gw.payment", b"{oops"),  # not JSON although it says so
        event("gw.payment", {**good, "currency": "GBP"}, content_type="application/vnd.x+json"),
    ]
    reply = await publish(stack, batch)
    refused = {r.index: r for r in reply.refused}
    assert sorted(refused) == [1, 4, 5, 6], reply
    assert refused[1].reason == "SCHEMA_VIOLATION" and "/amount" in refused[1].message
    assert refused[4].reason == "SCHEMA_VERSION_UNKNOWN"
    assert refused[5].reason == "SCHEMA_VIOLATION" and "not valid JSON" in refused[5].message
    assert refused[6].reason == "SCHEMA_VIOLATION" and "/currency" in refused[6].message
    assert reply.accepted == 3 and len(reply.event_ids) == len(batch)
    assert all(r.event_id == reply.event_ids[r.index] for r in reply.refused)
    queued = await queued_ids(stack)
    accepted = {reply.event_ids[i] for i in (0, 2, 3)}
    assert accepted <= queued and not {r.event_id for r in reply.refused} & queued
    # The named version, when it exists, is the one checked.
    named = await publish(stack, [event("gw.payment", good, schema_version=1)])
    assert named.accepted == 1 and not named.refused


async def test_the_stream_acknowledgement_carries_the_refusals(
    stack: Stack, registry: Registry
) -> None:
    await register(stack, registry, "gw.stream", PAYMENT)

    async def requests() -> AsyncIterator[gateway_pb2.PublishRequest]:
        yield gateway_pb2.PublishRequest(
            sequence=1,
            events=[event("gw.stream", {"id": "a", "amount": 1}), event("gw.stream", {"id": 3})],
        )

    replies = [r async for r in stack.gateway.Publish(requests(), **as_(stack, "producer"))]
    assert len(replies) == 1 and not replies[0].HasField("refusal")
    assert replies[0].accepted == 1
    assert [(r.index, r.reason) for r in replies[0].refused] == [(1, "SCHEMA_VIOLATION")]


async def test_a_new_version_reaches_the_running_ingest(stack: Stack, registry: Registry) -> None:
    open_v1 = {"type": "object", "properties": {"a": {"type": "number"}}}
    await register(stack, registry, "gw.prop", open_v1)
    # v1's open model accepts an undeclared "b"; v2 declares b a string (BACKWARD compatible:
    # producers of v1 never write b), and then refuses b = 5.
    probe = {"a": 1, "b": 5}
    assert (await publish(stack, [event("gw.prop", probe)])).accepted == 1  # v1 is cached now
    v2 = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "string"}}}
    started = time.monotonic()
    assert await register(stack, registry, "gw.prop", v2) == 2
    registered = time.monotonic()
    while True:
        reply = await publish(stack, [event("gw.prop", probe)])
        if reply.refused:
            break
        assert time.monotonic() - registered < PROPAGATION_BOUND_SECONDS, "v2 never arrived"
        await asyncio.sleep(0.02)
    arrived = time.monotonic()
    assert "/b" in reply.refused[0].message
    print(
        f"\nnew schema version in use by ingest {arrived - registered:.3f} s after RegisterSchema "
        f"returned ({arrived - started:.3f} s after it was sent; poll interval "
        f"{stack.schemas._poll_interval if stack.schemas else '?'} s)"
    )


async def test_types_without_a_schema_follow_the_tenant_policy(
    stack: Stack, registry: Registry
) -> None:
    policy = await registry.GetSchemaPolicy(pb.GetSchemaPolicyRequest(), **as_(stack, "producer"))
    assert policy.unknown_types == common.UNKNOWN_TYPE_POLICY_ACCEPT
    assert (await publish(stack, [event("gw.nobody", {"x": 1})])).accepted == 1
    await register(stack, registry, "gw.known", PAYMENT)
    await registry.SetSchemaPolicy(
        pb.SetSchemaPolicyRequest(unknown_types=common.UNKNOWN_TYPE_POLICY_REFUSE),
        **as_(stack, "schema-admin"),
    )
    try:
        registered = time.monotonic()
        while True:
            reply = await publish(
                stack, [event("gw.known", {"id": "k", "amount": 1}), event("gw.nobody", {})]
            )
            if reply.refused:
                break
            assert time.monotonic() - registered < PROPAGATION_BOUND_SECONDS
            await asyncio.sleep(0.02)
        print(f"\nREFUSE policy in use by ingest after {time.monotonic() - registered:.3f} s")
        assert [(r.index, r.reason) for r in reply.refused] == [(1, "SCHEMA_MISSING")]
        assert reply.accepted == 1
        # Non-JSON events are never checked, policy or not.
        binary = await publish(stack, [event("gw.nobody", b"\x00", content_type="image/png")])
        assert binary.accepted == 1
    finally:
        await registry.SetSchemaPolicy(
            pb.SetSchemaPolicyRequest(unknown_types=common.UNKNOWN_TYPE_POLICY_ACCEPT),
            **as_(stack, "schema-admin"),
        )
