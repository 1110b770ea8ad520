"""Events of two tenants through the real gateway, ingest, a stream worker and storage: both
publish the same event id, each is stored in its own tenant, and a query or count by one never
sees the other's; an id published again with other content is refused per event (ID_CONFLICT)
and the first stays stored; the same content again is acknowledged as a duplicate. A dead
letter belongs to its events' tenant: its tenant admin sees and replays it, nobody else."""

from __future__ import annotations

import uuid

import grpc
import pytest

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import admin_pb2, gateway_pb2
from tests.gateway.conftest import Stack
from tests.gateway.test_dead_letters import Pipeline, pipeline  # noqa: F401 (the fixture)
from tests.gateway.test_tenants import Tenants, tenants  # noqa: F401 (the module fixture)
from tests.processor.conftest import drained, wait_for

pytestmark = pytest.mark.timeout(180)


async def publish(
    stack: Stack, bearer: tuple[tuple[str, str], ...], *events: event_pb2.Event
) -> gateway_pb2.PublishBatchResponse:
    reply: gateway_pb2.PublishBatchResponse = await stack.gateway.PublishBatch(
        gateway_pb2.PublishBatchRequest(events=events), metadata=bearer, timeout=10
    )
    return reply


async def test_two_tenants_publish_one_id_and_each_reads_only_its_own(
    stack: Stack,
    tenants: Tenants,  # noqa: F811 (the imported fixture)
    pipeline: Pipeline,  # noqa: F811 (the imported fixture)
) -> None:
    run = uuid.uuid4().hex[:8]
    shared, key = f"shared-{run}", f"key-{run}"
    a, b = tenants.people["a-user"].bearer(), tenants.people["b-user"].bearer()
    for bearer, body in ((a, b'{"tenant":"a"}'), (b, b'{"tenant":"b"}')):
        reply = await publish(
            stack, bearer, event_pb2.Event(id=shared, key=key, type="t.x", payload=body)
        )
        assert (reply.accepted, list(reply.refused), list(reply.duplicates)) == (1, [], [])
    # A's id again: the same content is a duplicate, other content a conflict.
    same = event_pb2.Event(id=shared, key=key, type="t.x", payload=b'{"tenant":"a"}')
    other = event_pb2.Event(id=shared, key=key, type="t.x", payload=b'{"tenant":"a2"}')
    again = await publish(stack, a, same, other)
    assert (again.accepted, list(again.duplicates)) == (1, [0])
    assert [(r.index, r.event_id, r.reason) for r in again.refused] == [(1, shared, "ID_CONFLICT")]
    await wait_for(lambda: drained(stack.redis, stack.layout), limit=30)

    query = gateway_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(keys=[key]))
    count = gateway_pb2.CountEventsRequest(filter=event_pb2.EventFilter(keys=[key]))
    for bearer, body in ((a, b'{"tenant":"a"}'), (b, b'{"tenant":"b"}')):
        page = await stack.gateway.QueryEvents(query, metadata=bearer, timeout=10)
        assert [(e.event.id, e.event.payload) for e in page.events] == [(shared, body)]
        counted = await stack.gateway.CountEvents(count, metadata=bearer, timeout=10)
        assert counted.count == 1
    # The platform admin's tenant ("default") has neither.
    admin = stack.admin_person.bearer()
    assert (await stack.gateway.CountEvents(count, metadata=admin, timeout=10)).count == 0
    by_id = gateway_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(type="t.x"))
    seen = await stack.gateway.QueryEvents(by_id, metadata=b, timeout=10)
    assert {e.event.payload for e in seen.events if e.event.id == shared} == {b'{"tenant":"b"}'}


async def test_a_dead_letter_is_seen_and_replayed_only_in_its_tenant(
    stack: Stack,
    tenants: Tenants,  # noqa: F811 (the imported fixture)
    pipeline: Pipeline,  # noqa: F811 (the imported fixture)
) -> None:
    poison = f"poison-{uuid.uuid4().hex[:8]}"
    pipeline.poisoned.add(poison)
    user = tenants.people["a-user"].bearer()
    await publish(stack, user, event_pb2.Event(id=poison, key=poison, type="t.x", payload=b"{}"))
    await wait_for(lambda: drained(stack.redis, stack.layout), limit=30)
    listing = admin_pb2.ListDeadLettersRequest(page_size=500)

    async def ids(bearer: tuple[tuple[str, str], ...]) -> list[list[str]]:
        page = await stack.admin.ListDeadLetters(listing, metadata=bearer, timeout=10)
        return [list(d.event_ids) for d in page.dead_letters]

    assert await ids(tenants.people["a-admin"].bearer()) == [[poison]]
    assert [poison] not in await ids(stack.admin_person.bearer())
    assert await ids(tenants.people["b-admin"].bearer()) == []
    # Its tenant admin replays it into its tenant, where it is stored once.
    pipeline.poisoned.clear()
    boss = tenants.people["a-admin"].bearer()
    (dead,) = (await stack.admin.ListDeadLetters(listing, metadata=boss, timeout=10)).dead_letters
    replayed = await stack.admin.ReplayDeadLetter(
        admin_pb2.ReplayDeadLetterRequest(id=dead.id), metadata=boss, timeout=10
    )
    assert replayed.republished == 1
    await wait_for(lambda: drained(stack.redis, stack.layout), limit=30)
    count = gateway_pb2.CountEventsRequest(filter=event_pb2.EventFilter(keys=[poison]))
    assert (await stack.gateway.CountEvents(count, metadata=user, timeout=10)).count == 1
    other = tenants.people["b-admin"].bearer()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.admin.GetDeadLetter(
            admin_pb2.GetDeadLetterRequest(id=dead.id), metadata=other, timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
