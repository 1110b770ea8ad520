"""SubscribeEvents and SubscribeAlerts through the real gateway, ingest, a stream worker and
storage, with real tokens over mTLS: events published while subscribed arrive in order; a
reconnect with the last resume token continues with no gap and no repeat; the filter holds;
another tenant's events (and alerts) never arrive; the token belongs to the caller; a cancel at
the gateway ends storage's tail; `streammesh tail` prints JSON lines and resumes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.gateway.tokens import INVALID_TOKEN
from services.storage.server import DEFINITION_SERVICE
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2, rules_pb2
from streammesh.api.gateway.v1 import rules_pb2_grpc as rules_grpc
from streammesh.api.storage.v1 import definitions_pb2, storage_pb2
from streammesh.api.storage.v1 import definitions_pb2_grpc as definitions_grpc
from streammesh.api.storage.v1 import storage_pb2_grpc as storage_grpc
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.gateway.conftest import Stack, enrol_and_login
from tests.gateway.test_dead_letters import Pipeline, pipeline  # noqa: F401 (the fixture)
from tests.gateway.test_query_api import _cli, _cli_config
from tests.gateway.test_rules import People, people  # noqa: F401 (the module fixture)
from tests.gateway.test_tenants import Tenants, tenants  # noqa: F401 (the module fixture)
from tests.storage.test_output_subscriptions import alert, result

pytestmark = pytest.mark.timeout(180)

Bearer = tuple[tuple[str, str], ...]


async def publish(stack: Stack, bearer: Bearer, key: str, *ids: str, amount: int = 1) -> None:
    events = [
        event_pb2.Event(id=i, key=key, type="sub.t", payload=b'{"amount": %d}' % amount)
        for i in ids
    ]
    reply = await stack.gateway.PublishBatch(
        gateway_pb2.PublishBatchRequest(events=events), metadata=bearer, timeout=10
    )
    assert reply.accepted == len(ids)


async def collect(
    call: Any, until: Callable[[list[str], bool], bool], timeout: float = 30
) -> tuple[list[str], str]:
    """Event ids (seq checked increasing) until `until(ids, current_seen)`, and the last token."""
    ids: list[str] = []
    token, current, last = "", False, 0
    async with asyncio.timeout(timeout):
        async for message in call:
            token = message.resume_token
            for stored in message.events:
                assert stored.sequence > last
                last = stored.sequence
                ids.append(stored.event.id)
            current = current or message.current
            if until(ids, current):
                break
    return ids, token


async def test_live_events_resume_and_tenants_through_the_gateway(
    stack: Stack,
    tenants: Tenants,  # noqa: F811 (the imported fixture)
    pipeline: Pipeline,  # noqa: F811 (the imported fixture)
) -> None:
    run = uuid.uuid4().hex[:8]
    key = f"sub-{run}"
    a, b = tenants.people["a-user"].bearer(), tenants.people["b-user"].bearer()
    request = gateway_pb2.SubscribeEventsRequest(
        filter=event_pb2.EventFilter(keys=[key]), filter_expression="payload.amount > 1"
    )
    ours = stack.gateway.SubscribeEvents(request, metadata=a)
    theirs = stack.gateway.SubscribeEvents(request, metadata=b)
    for call in (ours, theirs):
        ids, token = await collect(call, lambda ids, current: current)
        assert ids == [] and token

    await publish(stack, b, key, f"b-{run}", amount=5)  # b's tenant: never reaches a
    await publish(stack, a, key, f"small-{run}", amount=1)  # filtered out
    for n in range(3):
        await publish(stack, a, key, f"a{n}-{run}", amount=5)
    ids, token = await collect(ours, lambda ids, _: len(ids) >= 3)
    assert ids == [f"a{n}-{run}" for n in range(3)]
    b_ids, _ = await collect(theirs, lambda ids, _: bool(ids))
    assert b_ids == [f"b-{run}"]
    theirs.cancel()
    ours.cancel()

    # Published while a is away: the resumed stream starts exactly after a2.
    for n in range(3, 6):
        await publish(stack, a, key, f"a{n}-{run}", amount=5)
    resumed = stack.gateway.SubscribeEvents(
        gateway_pb2.SubscribeEventsRequest(
            filter=request.filter, filter_expression=request.filter_expression, resume_token=token
        ),
        metadata=a,
    )
    ids, _ = await collect(resumed, lambda ids, _: len(ids) >= 3)
    assert ids == [f"a{n}-{run}" for n in range(3, 6)]
    resumed.cancel()

    # The token is bound to its user: another user of the same tenant is refused.
    same = tenants.people["a-same"].bearer()
    stolen = stack.gateway.SubscribeEvents(
        gateway_pb2.SubscribeEventsRequest(
            filter=request.filter, filter_expression=request.filter_expression, resume_token=token
        ),
        metadata=same,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stolen, lambda ids, current: current)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resume_token" in (caught.value.details() or "")


async def test_a_cancel_at_the_gateway_ends_the_storage_tail(stack: Stack) -> None:
    analyst = stack.people["analyst"].bearer()
    call = stack.gateway.SubscribeEvents(gateway_pb2.SubscribeEventsRequest(), metadata=analyst)
    first = await call.read()
    assert first.current and first.resume_token
    tails = await _storage_tails(stack)
    assert tails >= 1  # ours (and any other test's still closing)
    call.cancel()
    deadline = time.monotonic() + 5
    while await _storage_tails(stack) != tails - 1:
        assert time.monotonic() < deadline, "storage's tail outlived the client's cancel"
        await asyncio.sleep(0.05)


async def _storage_tails(stack: Stack) -> int:
    """Storage's running tails (its replica's gauge)."""
    assert stack.storage_server is not None
    value = stack.storage_server.metrics.registry.get_sample_value("streammesh_storage_tails")
    return int(value or 0)


async def test_the_cli_tails_as_json_and_resumes_from_the_printed_token(
    stack: Stack,
    pipeline: Pipeline,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    person = stack.people["producer+analyst"]
    config = _cli_config(stack, person, tmp_path)
    key = f"cli-{uuid.uuid4().hex[:8]}"
    await publish(stack, person.bearer(), key, f"{key}-0", f"{key}-1", f"{key}-2")
    assert await _cli(config, "tail", "--key", key, "--json", "--max-events", "3") == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    ids = [stored["event"]["id"] for line in lines for stored in line["events"]]
    assert ids == [f"{key}-0", f"{key}-1", f"{key}-2"]
    token = err.strip().splitlines()[-1].removeprefix("resume token: ")
    assert token == lines[-1]["resume_token"]

    await publish(stack, person.bearer(), key, f"{key}-3", f"{key}-4")
    argv = ("tail", "--key", key, "--resume", token, "--max-events", "2")
    assert await _cli(config, *argv) == 0
    out = capsys.readouterr().out
    assert f"{key}-3" in out and f"{key}-4" in out and f"{key}-2" not in out


async def test_alerts_live_through_the_rule_service_by_tenant_and_role(
    stack: Stack,
    people: People,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Alerts the processor records reach the analyst of their tenant live, not the other
    tenant's (and `streammesh tail --alerts` shows them), window results likewise; a producer
    may not subscribe."""
    run = people.by_name["a-analyst"].username.rsplit("-", 1)[1]
    rules = rules_grpc.RuleServiceStub(stack.gateway_channel)
    mine = rules.SubscribeAlerts(
        rules_pb2.SubscribeAlertsRequest(start_at_end=True),
        metadata=people.by_name["a-analyst"].bearer(),
    )
    theirs = rules.SubscribeAlerts(
        rules_pb2.SubscribeAlertsRequest(start_at_end=True),
        metadata=people.by_name["b-rules"].bearer(),
    )
    for call in (mine, theirs):
        assert (await call.read()).current
    channel = create_channel(
        f"127.0.0.1:{stack.storage_port}",
        TlsMaterial.load(stack.pki_dir, "processor"),
        server_name="storage",
        config=service_config(DEFINITION_SERVICE, health_checked=False),
    )
    try:
        processor = definitions_grpc.DefinitionServiceStub(channel)
        await processor.StoreEngineOutputs(
            definitions_pb2.StoreEngineOutputsRequest(
                alerts=[alert(1, tenant=f"ra-{run}"), alert(2, tenant=f"rb-{run}")],
                window_results=[result(4, tenant=f"ra-{run}"), result(5, tenant=f"rb-{run}")],
            ),
            timeout=10,
        )
    finally:
        await channel.close()
    for call, tenant in ((mine, f"ra-{run}"), (theirs, f"rb-{run}")):
        message = await asyncio.wait_for(call.read(), 10)
        assert [a.tenant for a in message.alerts] == [tenant]
        call.cancel()
    results = rules.SubscribeWindowResults(
        rules_pb2.SubscribeWindowResultsRequest(window_id="per-minute"),
        metadata=people.by_name["a-analyst"].bearer(),
    )
    message = await asyncio.wait_for(results.read(), 10)
    assert [(r.tenant, r.partition) for r in message.window_results] == [(f"ra-{run}", 4)]
    results.cancel()
    producer = rules.SubscribeAlerts(
        rules_pb2.SubscribeAlertsRequest(), metadata=people.by_name["a-producer"].bearer()
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await producer.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    config = _cli_config(stack, people.by_name["a-analyst"], tmp_path)
    assert await _cli(config, "tail", "--alerts", "--json", "--max-events", "1") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["tenant"] for line in lines for a in line["alerts"]] == [f"ra-{run}"]
    argv = ("tail", "--windows", "--window", "per-minute", "--max-events", "1")
    assert await _cli(config, *argv, "--json") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    found = [(r["tenant"], r["partition"]) for line in lines for r in line["window_results"]]
    assert found == [(f"ra-{run}", 4)]
    assert await _cli(config, *argv) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if "per-minute" in line]
    assert row.split()[0] == "per-minute" and " eu " in row and '"orders"' in row


async def test_a_subscription_ends_when_its_session_is_revoked(stack: Stack) -> None:
    """A subscription outlives the check of its token at the start: after a logout the next
    message the gateway would relay ends the stream UNAUTHENTICATED instead."""
    person = await enrol_and_login(stack, f"gw-sub-{uuid.uuid4().hex[:6]}", ("analyst",))
    key = f"revoked-{uuid.uuid4().hex[:8]}"
    call = stack.gateway.SubscribeEvents(
        gateway_pb2.SubscribeEventsRequest(filter=event_pb2.EventFilter(keys=[key])),
        metadata=person.bearer(),
    )
    assert (await call.read()).current
    await stack.gateway.Logout(
        gateway_pb2.LogoutRequest(refresh_token=person.refresh_token), timeout=10
    )
    channel = create_channel(
        f"127.0.0.1:{stack.storage_port}",
        TlsMaterial.load(stack.pki_dir, "processor"),
        server_name="storage",
        config=service_config("streammesh.storage.v1.StorageService", health_checked=False),
    )
    try:
        processor = storage_grpc.StorageServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(30):
                for n in range(300):  # an event a tick, until the gateway learnt of the logout
                    batch = event_pb2.QueuedBatch(partition=0)
                    queued = batch.events.add(producer="p")
                    queued.event.id, queued.event.key, queued.event.type = f"{key}-{n}", key, "t"
                    queued.ingest_time.GetCurrentTime()
                    await processor.StoreEvents(
                        storage_pb2.StoreEventsRequest(batch=batch), timeout=10
                    )
                    await call.read()
                    await asyncio.sleep(0.1)
    finally:
        await channel.close()
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ended.value.details() == INVALID_TOKEN
