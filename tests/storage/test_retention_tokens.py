"""Page and resume tokens against the retention (services/storage/retention.py), on real
Postgres and mTLS: events in an old partition, the partition dropped (or a tenant's rows
deleted) by the retention code, then the token replayed -> OUT_OF_RANGE with a message saying
what was removed and what to do; a token whose position the retention did not pass, or of a
tenant it removed nothing of, keeps working."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from services.storage.partitions import MaintenanceReport, PartitionPolicy, maintain
from services.storage.retention import Horizon, fell_off
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from tests.storage.conftest import BASE_TIME, Stub, queued, schema_connection
from tests.storage.test_query_api import field_violations
from tests.storage.test_subscriptions import read_until, subscribe

_NOW = datetime.now(UTC)
TOMORROW = datetime(_NOW.year, _NOW.month, _NOW.day, tzinfo=UTC) + timedelta(days=1)
"""The first day of a daily partition: the migration's one holds everything before it."""
OLD = BASE_TIME
"""An ingest time in the migration's partition (before tomorrow), dropped below."""
KEPT = TOMORROW + timedelta(hours=1)
"""An ingest time in tomorrow's partition, which the passes below keep."""
PASS_NOW = TOMORROW + timedelta(days=1, hours=2)
"""The passes' clock: with a retention of 1 day, the cutoff is TOMORROW + 2 h."""


async def store(
    stub: Stub, tenant: str, ingest: datetime, ids: list[str], *, key: str = "k"
) -> None:
    batch = event_pb2.QueuedBatch(
        events=[queued(key, event_id=i, ingest_time=ingest) for i in ids],
        partition=0,
        tenant=tenant,
    )
    await stub.StoreEvents(storage_pb2.StoreEventsRequest(batch=batch), timeout=10)


async def page(stub: Stub, tenant: str, size: int, token: str = "") -> tuple[list[str], str]:
    reply = await stub.QueryEvents(
        storage_pb2.QueryEventsRequest(
            tenant=tenant, principal="ana", page_size=size, page_token=token
        ),
        timeout=10,
    )
    return [stored.event.id for stored in reply.events], reply.next_page_token


async def run_pass(database_url: str, schema: str, policy: PartitionPolicy) -> MaintenanceReport:
    """One retention pass at PASS_NOW (retried while the server's own pass holds the lock)."""
    async with schema_connection(database_url, schema) as conn:
        for _ in range(100):
            report = await maintain(conn, policy, now=PASS_NOW)
            if report.ran:
                return report
            await asyncio.sleep(0.05)
    raise AssertionError("the maintenance lock stayed taken")


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def ensure_tomorrow(database_url: str, schema: str) -> None:
    async with schema_connection(database_url, schema) as conn:
        for _ in range(100):
            if (await maintain(conn, PartitionPolicy(days_ahead=2))).ran:
                return
            await asyncio.sleep(0.05)


async def test_a_page_token_past_a_dropped_partition_is_out_of_range(
    processor: Stub, gateway: Stub, database_url: str, pg_schema: str
) -> None:
    await ensure_tomorrow(database_url, pg_schema)
    await store(processor, "acme", OLD, ["o1", "o2", "o3"])
    await store(processor, "acme", KEPT, ["n1", "n2"])
    await store(processor, "globex", OLD, ["g1", "g2"])
    await store(processor, "other", KEPT, ["x1", "x2"])
    first, inside = await page(gateway, "acme", 1)  # after o1: o2 and o3 are to come
    assert first == ["o1"]
    ended, at_edge = await page(gateway, "acme", 3)  # after o3, the last removed one
    assert ended == ["o1", "o2", "o3"]
    _, other_tenant = await page(gateway, "other", 1)

    report = await run_pass(database_url, pg_schema, PartitionPolicy(retention_days=1))
    assert any(name.startswith("events_p_before_") for name in report.dropped)

    error = await refusal(page(gateway, "acme", 10, inside))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    details = error.details() or ""
    assert "fell off the retention" in details, details
    assert f"before {TOMORROW:%Y-%m-%d}T00:00:00Z were removed" in details, details
    assert "without page_token" in details, details
    assert field_violations(error) == ["page_token"]
    # Positions the retention did not pass hold: at the last removed event, and of a tenant
    # that lost nothing; a new query works.
    assert await page(gateway, "acme", 10, at_edge) == (["n1", "n2"], "")
    assert await page(gateway, "other", 10, other_tenant) == (["x2"], "")
    assert await page(gateway, "acme", 10) == (["n1", "n2"], "")
    # globex lost everything: a token of it from before would be refused; a new one is fine.
    assert await page(gateway, "globex", 10) == ([], "")


async def test_a_tenant_retention_refuses_that_tenants_tokens_only(
    processor: Stub, gateway: Stub, database_url: str, pg_schema: str
) -> None:
    await ensure_tomorrow(database_url, pg_schema)
    await store(processor, "tiny", KEPT, ["t1", "t2", "t3"])
    await store(processor, "tiny", PASS_NOW, ["t4"])  # after the tenant's cutoff: kept
    await store(processor, "acme", KEPT, ["a1", "a2"])
    _, tiny_token = await page(gateway, "tiny", 1)
    _, acme_token = await page(gateway, "acme", 1)

    report = await run_pass(
        database_url, pg_schema, PartitionPolicy(tenant_retention_days={"tiny": 1})
    )
    assert report.deleted_rows == 3 and report.dropped == []

    error = await refusal(page(gateway, "tiny", 10, tiny_token))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert await page(gateway, "acme", 10, acme_token) == (["a2"], "")
    assert await page(gateway, "tiny", 10) == (["t4"], "")


async def test_a_resume_token_past_the_retention_is_out_of_range(
    processor: Stub, gateway: Stub, database_url: str, pg_schema: str
) -> None:
    await ensure_tomorrow(database_url, pg_schema)
    await store(processor, "acme", OLD, ["o1", "o2"])
    # A tail that received o1 only (a page of one, resumed as a subscription: the tokens are
    # the same kind), and one that received everything.
    _, behind = await page(gateway, "acme", 1)
    call = subscribe(gateway, principal="ana")
    ids, caught_up, current = await read_until(call, lambda ids, current: current)
    call.cancel()
    assert ids == ["o1", "o2"] and current

    await run_pass(database_url, pg_schema, PartitionPolicy(retention_days=1))
    await store(processor, "acme", KEPT, ["n1"])

    resumed = subscribe(gateway, principal="ana", resume_token=behind)
    error = await refusal(read_until(resumed, lambda ids, current: current))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    details = error.details() or ""
    assert "resume_token" in details and "from a start time or from now" in details, details
    assert field_violations(error) == ["resume_token"]
    held = subscribe(gateway, principal="ana", resume_token=caught_up)
    ids, _, current = await read_until(held, lambda ids, current: current)
    held.cancel()
    assert ids == ["n1"] and current


async def test_a_live_tail_at_the_head_goes_on_through_a_retention_pass(
    processor: Stub, gateway: Stub, database_url: str, pg_schema: str
) -> None:
    """A tail past its `current` marker reads the replica's shared feed, at the head of the
    table: a retention pass removes only rows it has already passed, so it goes on, with no
    refusal and no skip (a resume token from before the pass is what gets OUT_OF_RANGE: the
    tests above)."""
    await ensure_tomorrow(database_url, pg_schema)
    await store(processor, "acme", OLD, ["o0"], key="mine")
    await store(processor, "acme", OLD, ["o1", "o2"], key="theirs")
    call = subscribe(gateway, principal="ana", filter=event_pb2.EventFilter(keys=["mine"]))
    ids, _, current = await read_until(call, lambda ids, current: current)
    assert ids == ["o0"] and current
    await run_pass(database_url, pg_schema, PartitionPolicy(retention_days=1))
    await store(processor, "acme", KEPT, ["n1"], key="mine")
    ids, _, _ = await read_until(call, lambda ids, _: "n1" in ids)
    assert ids == ["n1"]
    call.cancel()


def test_the_refusal_rule() -> None:
    """Refused only when something was removed since the token (the generation moved) and
    the highest removed seq is past its position; a token without a generation (issued before
    tokens carried one) counts as generation 0."""
    horizon = Horizon(generation=3, removed_through_seq=100, removed_before=0, removed_at=0)
    assert fell_off(None, after_seq=5, generation=0, field="page_token") is None
    assert fell_off(horizon, after_seq=5, generation=3, field="page_token") is None
    assert fell_off(horizon, after_seq=100, generation=2, field="page_token") is None
    refused = fell_off(horizon, after_seq=99, generation=2, field="resume_token")
    assert refused is not None and refused.code == grpc.StatusCode.OUT_OF_RANGE
    assert refused.field_violations[0][0] == "resume_token"
    assert fell_off(horizon, after_seq=99, generation=0, field="page_token") is not None
