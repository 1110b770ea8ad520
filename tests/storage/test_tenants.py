"""Events and dead letters by tenant at storage, over real mTLS and a real Postgres schema:
rows are filed under each run's tenant (`columns.run_tenants`; entries written before tenants,
and QueuedBatch entries without one, under "default"), (tenant, id) is the idempotency key, and
every read is scoped to the tenant the gateway names (x-streammesh-tenant); a stored id
published again with other content is recorded in event_conflicts, the first event kept."""

from __future__ import annotations

import datetime as dt
import hashlib

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.tenancy import TENANT_METADATA
from streammesh.wire import varint_field
from tests.storage.conftest import BASE_TIME, Stub, as_columns, queued

_RUN_PARTITIONS = event_pb2.QueuedColumns.RUN_PARTITIONS_FIELD_NUMBER


def entry(partition: int, tenant: str | None, events: list[event_pb2.QueuedEvent]) -> bytes:
    """An entry as ingest writes it (one run; no run_tenants when `tenant` is None, as before
    tenants), followed by its partition as the processor appends it."""
    columns = as_columns(event_pb2.QueuedBatch(events=events, partition=partition))
    del columns.ingest_time_micros[1:], columns.producers[1:]
    columns.run_lengths[:] = [len(events)]
    if tenant is not None:
        columns.run_tenants[:] = [tenant]
    return columns.SerializeToString() + varint_field(_RUN_PARTITIONS, partition)


def as_tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((TENANT_METADATA, tenant),)


async def stored(engine: AsyncEngine) -> list[tuple[str, str, bytes]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT tenant, id, payload FROM events ORDER BY seq"))
        return [(row[0], row[1], row[2]) for row in rows]


async def test_each_run_is_stored_under_its_tenant_and_ids_are_per_tenant(
    processor: Stub, engine: AsyncEngine
) -> None:
    merged = event_pb2.QueuedColumns.FromString(
        entry(0, "acme", [queued("k", event_id="e1", payload=b'{"t":"acme"}')])
        + entry(1, "globex", [queued("k", event_id="e1", payload=b'{"t":"globex"}')])
        + entry(3, "acme", [queued("k", event_id="e1", payload=b'{"t":"again"}')])
        + entry(2, "default", [queued("k", event_id="e1", payload=b'{"t":"default"}')])
    )
    assert list(merged.run_tenants) == ["acme", "globex", "acme", "default"]
    request = storage_pb2.StoreEventsRequest(columns=merged)
    reply = await processor.StoreEvents(request, timeout=5)
    assert (reply.inserted, reply.duplicates) == (3, 1)
    assert await stored(engine) == [
        ("acme", "e1", b'{"t":"acme"}'),
        ("globex", "e1", b'{"t":"globex"}'),
        ("default", "e1", b'{"t":"default"}'),
    ]
    again = await processor.StoreEvents(request, timeout=5)
    assert (again.inserted, again.duplicates) == (0, 4)


async def test_an_entry_without_tenants_is_not_concatenated_with_one_that_has_them(
    processor: Stub, engine: AsyncEngine
) -> None:
    """An entry of an ingest before tenants adds no run_tenants, so concatenated with entries
    that have them it leaves fewer values than runs: refused whole (nothing stored), and the
    processor stores its entries one by one, as after any refusal of a group."""
    merged = event_pb2.QueuedColumns.FromString(
        entry(0, "acme", [queued(event_id="n1")]) + entry(1, None, [queued(event_id="o1")])
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(storage_pb2.StoreEventsRequest(columns=merged), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await stored(engine) == []


async def test_entries_without_tenants_and_batches_store_under_default(
    processor: Stub, gateway: Stub, engine: AsyncEngine
) -> None:
    old = event_pb2.QueuedColumns.FromString(entry(0, None, [queued(event_id="o1")]))
    await processor.StoreEvents(storage_pb2.StoreEventsRequest(columns=old), timeout=5)
    batch = event_pb2.QueuedBatch(events=[queued(event_id="b1")], partition=1)
    await processor.StoreEvents(storage_pb2.StoreEventsRequest(batch=batch), timeout=5)
    batch = event_pb2.QueuedBatch(events=[queued(event_id="b1")], partition=1, tenant="acme")
    await processor.StoreEvents(storage_pb2.StoreEventsRequest(batch=batch), timeout=5)
    assert [(t, i) for t, i, _ in await stored(engine)] == [
        ("default", "o1"),
        ("default", "b1"),
        ("acme", "b1"),
    ]


@pytest.mark.parametrize("tenant", ["ACME", "a", "x\x00y", "bad tenant"])
async def test_a_malformed_tenant_is_refused(processor: Stub, tenant: str) -> None:
    columns = event_pb2.QueuedColumns.FromString(entry(0, tenant, [queued(event_id="m1")]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await processor.StoreEvents(storage_pb2.StoreEventsRequest(columns=columns), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "run_tenants" in (caught.value.details() or "")


async def test_queries_and_counts_see_only_the_callers_tenant(
    processor: Stub, gateway: Stub
) -> None:
    for tenant, payload in (("acme", b'{"a":1}'), ("globex", b'{"g":1}'), ("default", b"{}")):
        columns = event_pb2.QueuedColumns.FromString(
            entry(0, tenant, [queued("k", event_id="same", payload=payload), queued("k")])
        )
        await processor.StoreEvents(storage_pb2.StoreEventsRequest(columns=columns), timeout=5)
    query = storage_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(keys=["k"]))
    count = storage_pb2.CountEventsRequest(filter=event_pb2.EventFilter(keys=["k"]))
    for tenant, payload in (("acme", b'{"a":1}'), ("globex", b'{"g":1}')):
        page = await gateway.QueryEvents(query, metadata=as_tenant(tenant), timeout=5)
        assert len(page.events) == 2
        assert [e.event.payload for e in page.events if e.event.id == "same"] == [payload]
        counted = await gateway.CountEvents(count, metadata=as_tenant(tenant), timeout=5)
        assert counted.count == 2
    # A call that names no tenant (an operator's tool) reads "default".
    assert (await gateway.CountEvents(count, timeout=5)).count == 2
    assert (await gateway.CountEvents(count, metadata=as_tenant("nobody"), timeout=5)).count == 0


async def test_dead_letters_belong_to_their_batchs_tenant(processor: Stub, gateway: Stub) -> None:
    created = []
    for n, tenant in enumerate(("acme", "", "globex")):
        batch = event_pb2.QueuedBatch(events=[queued(event_id=f"d{n}")], tenant=tenant)
        reply = await processor.StoreDeadLetter(
            storage_pb2.StoreDeadLetterRequest(
                stream="s:p0",
                partition=0,
                entry_id=f"{n + 1}-0",
                batch=batch.SerializeToString(),
                event_ids=[f"d{n}"],
                error="INTERNAL: boom",
                delivery_count=3,
            ),
            timeout=5,
        )
        created.append(reply.dead_letter.id)
    listing = storage_pb2.ListDeadLettersRequest()
    for tenant, expected in (("acme", [created[0]]), ("default", [created[1]]), ("x-y", [])):
        page = await gateway.ListDeadLetters(listing, metadata=as_tenant(tenant), timeout=5)
        assert [d.id for d in page.dead_letters] == expected
    own = await gateway.GetDeadLetter(
        storage_pb2.GetDeadLetterRequest(id=created[2]), metadata=as_tenant("globex"), timeout=5
    )
    assert [q.event.id for q in own.events] == ["d2"]
    for call in (
        gateway.GetDeadLetter(
            storage_pb2.GetDeadLetterRequest(id=created[2]), metadata=as_tenant("acme"), timeout=5
        ),
        gateway.MarkDeadLetterReplayed(
            storage_pb2.MarkDeadLetterReplayedRequest(id=created[2], replayed_by="user:x"),
            metadata=as_tenant("acme"),
            timeout=5,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        # Exactly as a dead letter that does not exist: another tenant's is not even confirmed.
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def conflicts(engine: AsyncEngine) -> list[tuple[str, str, str, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT tenant, id, encode(payload_sha256, 'hex'), payload_bytes"
                " FROM event_conflicts ORDER BY recorded_at, ingest_time"
            )
        )
        return [(row[0], row[1], row[2], row[3]) for row in rows]


def columns_of(tenant: str, *events: event_pb2.QueuedEvent) -> storage_pb2.StoreEventsRequest:
    return storage_pb2.StoreEventsRequest(
        columns=event_pb2.QueuedColumns.FromString(entry(0, tenant, list(events)))
    )


async def test_a_stored_id_with_other_content_is_recorded_as_a_conflict_and_the_first_kept(
    processor: Stub, engine: AsyncEngine
) -> None:
    first = queued("k", event_id="c1", payload=b'{"v":1}')
    reply = await processor.StoreEvents(columns_of("acme", first), timeout=5)
    assert reply.inserted == 1
    later = BASE_TIME + dt.timedelta(seconds=90)
    changed = queued("k", event_id="c1", payload=b'{"v":2}', ingest_time=later)
    # The same id again: a re-delivery, a retry without an event time (it got a new ingest time,
    # so a new event time), other content; another tenant's c1; a repeat inside one batch.
    retry = queued("k", event_id="c1", payload=b'{"v":1}', ingest_time=later)
    for request in (
        columns_of("acme", first),
        columns_of("acme", retry),
        columns_of("acme", changed),
        columns_of("acme", changed),  # its re-delivery records nothing more
        columns_of("globex", changed),
        columns_of("acme", queued("k", event_id="c2"), queued("k2", event_id="c2")),
    ):
        await processor.StoreEvents(request, timeout=5)
    assert [(t, i, p) for t, i, p in await stored(engine)] == [
        ("acme", "c1", b'{"v":1}'),
        ("globex", "c1", b'{"v":2}'),
        ("acme", "c2", b'{"n":1}'),
    ]
    assert await conflicts(engine) == [
        ("acme", "c1", hashlib.sha256(b'{"v":2}').hexdigest(), 7),
        ("acme", "c2", hashlib.sha256(b'{"n":1}').hexdigest(), 7),  # the key differs
    ]
