"""The query API through the gateway: a filter string, pages whose token only the principal it
was issued to can replay, counts and aggregates, with real tokens from auth over mTLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.storage.partitions import PartitionPolicy, maintain
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import (
    gateway_pb2,
    rules_pb2,
    rules_pb2_grpc,
    schema_registry_pb2,
    schema_registry_pb2_grpc,
)
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.cli.main import build_parser
from streammesh.cli.session import Session
from streammesh.cli.stack import StackConfig
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.gateway.conftest import Person, Stack
from tests.storage.conftest import schema_connection


async def store_as_processor(
    stack: Stack, key: str, amounts: tuple[int, ...], *, ingest_time: dt.datetime | None = None
) -> None:
    """Events `<key>-<amount>` stored as the processor stores them (ingest time now unless
    given)."""
    channel = create_channel(
        f"127.0.0.1:{stack.storage_port}",
        TlsMaterial.load(stack.pki_dir, "processor"),
        server_name="storage",
        config=service_config("streammesh.storage.v1.StorageService", health_checked=False),
    )
    batch = event_pb2.QueuedBatch(partition=0)
    for amount in amounts:
        queued = batch.events.add(producer="p")
        queued.event.id, queued.event.key, queued.event.type = f"{key}-{amount}", key, "order"
        queued.event.payload = f'{{"amount": {amount}}}'.encode()
        if ingest_time is None:
            queued.ingest_time.GetCurrentTime()
        else:
            queued.ingest_time.FromDatetime(ingest_time)
    try:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        await stub.StoreEvents(storage_pb2.StoreEventsRequest(batch=batch), timeout=10)
    finally:
        await channel.close()


@pytest.fixture(scope="module")
async def stored(stack: Stack) -> str:
    """Five events of a key of this module's own."""
    key = f"query-{uuid.uuid4().hex[:8]}"
    await store_as_processor(stack, key, (5, 15, 25, 35, 45))
    return key


async def test_pages_of_a_filter_and_their_token_belong_to_the_caller(
    stack: Stack, stored: str
) -> None:
    analyst, other = stack.people["analyst"], stack.people["producer+analyst"]
    request = gateway_pb2.QueryEventsRequest(
        filter=event_pb2.EventFilter(keys=[stored]),
        filter_expression="payload.amount > 10",
        page_size=2,
    )
    first = await stack.gateway.QueryEvents(request, metadata=analyst.bearer(), timeout=10)
    assert [s.event.id for s in first.events] == [f"{stored}-15", f"{stored}-25"]
    request.page_token = first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.QueryEvents(request, metadata=other.bearer(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (caught.value.details() or "")
    second = await stack.gateway.QueryEvents(request, metadata=analyst.bearer(), timeout=10)
    assert [s.event.id for s in second.events] == [f"{stored}-35", f"{stored}-45"]
    assert second.next_page_token == ""
    request.filter_expression = "payload.amount > 20"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.QueryEvents(request, metadata=analyst.bearer(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_counts_and_aggregates_through_the_gateway(stack: Stack, stored: str) -> None:
    analyst = stack.people["analyst"].bearer()
    only = event_pb2.EventFilter(keys=[stored])
    count = await stack.gateway.CountEvents(
        gateway_pb2.CountEventsRequest(filter=only, filter_expression="payload.amount >= 25"),
        metadata=analyst,
        timeout=10,
    )
    assert count.count == 3
    reply = await stack.gateway.AggregateEvents(
        gateway_pb2.AggregateEventsRequest(
            filter=only, group_by=event_pb2.AGGREGATE_GROUP_BY_KEY, field="payload.amount"
        ),
        metadata=analyst,
        timeout=10,
    )
    (group,) = reply.groups
    assert (group.group, group.count, group.sum, group.min, group.max, group.avg) == (
        stored,
        5,
        125.0,
        5.0,
        45.0,
        25.0,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.AggregateEvents(
            gateway_pb2.AggregateEventsRequest(filter_expression="payload.amount >"),
            metadata=analyst,
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "column 17" in (caught.value.details() or "")


def _cli_config(stack: Stack, person: Person, state_dir: Path) -> StackConfig:
    """The CLI's state as `streammesh login` leaves it, for `person`, against this stack."""
    (state_dir / "pki").symlink_to(stack.pki_dir)
    config = StackConfig(state_dir=state_dir, gateway_port=stack.gateway_port)
    now = time.time()
    session = Session(
        person.username,
        person.access_token,
        person.refresh_token,
        now + 600,
        now + 600,
        person.roles,
    )
    session.save(config)
    return config


async def _cli(config: StackConfig, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    code: int = await args.handler(config, args)
    return code


async def test_the_cli_prints_tables_json_and_points_at_a_bad_filter(
    stack: Stack, stored: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _cli_config(stack, stack.people["analyst"], tmp_path)
    assert await _cli(config, "query", "payload.amount > 30", "--key", stored) == 0
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["seq", "event", "time", "key", "type"]
    assert [row.split()[-1] for row in rows] == [f"{stored}-35", f"{stored}-45"]

    assert await _cli(config, "query", "--key", stored, "--page-size", "2", "--json") == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["events"]) == 2 and first["next_page_token"]
    assert await _cli(config, "query", "--key", stored, "--page-size", "2", "--all", "--json") == 0
    every = json.loads(capsys.readouterr().out)
    assert len(every["events"]) == 5 and every["next_page_token"] == ""

    assert await _cli(config, "query", "--key", stored, "--count", "payload.amount < 20") == 0
    assert capsys.readouterr().out.strip() == "count: 2"
    argv = ("aggregate", "--key", stored, "--by", "key", "--field", "payload.amount")
    assert await _cli(config, *argv) == 0
    header, _, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["group", "count", "values", "sum", "min", "max", "avg"]
    assert row.split() == [stored, "5", "5", "125", "5", "45", "25"]

    assert await _cli(config, "query", "payload.amount >") == 1
    error = capsys.readouterr().err.splitlines()
    assert error[0].startswith("INVALID_ARGUMENT: filter: unexpected end of filter")
    assert error[-2:] == ["  payload.amount >", "  " + " " * 16 + "^"]  # column 17
    assert await _cli(config, "query", "--since", "yesterday") == 2
    assert "--since: 'yesterday' is not an RFC 3339 time" in capsys.readouterr().err


async def test_page_sizes_follow_aip_158_through_the_gateway(stack: Stack, stored: str) -> None:
    """0 is the default, above the maximum is lowered to it, negative is INVALID_ARGUMENT:
    the same rule for events, schemas and rules (storage's listings)."""
    analyst = stack.people["analyst"].bearer()
    request = gateway_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(keys=[stored]))
    for size in (0, 1001, 2**31 - 1):
        request.page_size = size
        page = await stack.gateway.QueryEvents(request, metadata=analyst, timeout=10)
        assert len(page.events) == 5 and not page.next_page_token, size
    rules: Any = rules_pb2_grpc.RuleServiceStub(stack.gateway_channel)
    subjects: Any = schema_registry_pb2_grpc.SchemaRegistryServiceStub(stack.gateway_channel)
    calls: list[Callable[[int], Awaitable[Any]]] = [
        lambda size: stack.gateway.QueryEvents(
            gateway_pb2.QueryEventsRequest(page_size=size), metadata=analyst, timeout=10
        ),
        lambda size: subjects.ListSubjects(
            schema_registry_pb2.ListSubjectsRequest(page_size=size), metadata=analyst, timeout=10
        ),
        lambda size: rules.ListRules(
            rules_pb2.ListRulesRequest(page_size=size), metadata=analyst, timeout=10
        ),
    ]
    for call in calls:
        await call(5000)  # lowered, not refused
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(-1)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_size" in (caught.value.details() or "")


async def test_the_cli_refuses_a_negative_page_size_before_calling(
    stack: Stack, stored: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _cli_config(stack, stack.people["analyst"], tmp_path)
    with pytest.raises(SystemExit) as exited:
        await _cli(config, "query", "--key", stored, "--page-size", "-1")
    assert exited.value.code == 2
    assert "page_size must not be negative" in capsys.readouterr().err
    assert await _cli(config, "query", "--key", stored, "--page-size", "5000", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["events"]) == 5


async def test_a_page_token_the_retention_passed_is_out_of_range_at_the_gateway(
    stack: Stack, database_url: str
) -> None:
    """A tenant retention pass (storage's own code, on the stack's schema) removes events a
    token's position was before: the gateway passes storage's OUT_OF_RANGE on, message and
    field included. The pass removes only this test's events (ingested a year ago)."""
    analyst = stack.people["analyst"].bearer()
    key = f"old-{uuid.uuid4().hex[:8]}"
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=365)
    await store_as_processor(stack, key, (1, 2, 3), ingest_time=long_ago)
    request = gateway_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(keys=[key]), page_size=1)
    first = await stack.gateway.QueryEvents(request, metadata=analyst, timeout=10)
    assert [s.event.id for s in first.events] == [f"{key}-1"]
    tenant = "default"
    async with schema_connection(database_url, stack.storage_schema) as conn:
        policy = PartitionPolicy(tenant_retention_days={tenant: 1})
        for _ in range(100):
            report = await maintain(conn, policy, now=long_ago + dt.timedelta(days=1, hours=1))
            if report.ran:
                break
            await asyncio.sleep(0.05)
    assert report.deleted_rows == 3
    request.page_token = first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.gateway.QueryEvents(request, metadata=analyst, timeout=10)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    details = caught.value.details() or ""
    assert "fell off the retention" in details and "without page_token" in details, details
