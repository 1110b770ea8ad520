"""SubscribeAlerts and SubscribeWindowResults at storage over real mTLS and Postgres: alerts
recorded before, the `current` marker, then live ones in record order (not event-time order); a
replayed batch adds nothing; resume with the token continues with no gap and no repeat; the rule
(or window) filter and the tenant hold; an alert committed late with a lower seq is not passed;
the tail limit is shared with event subscriptions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.server import DEFINITION_SERVICE
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.api.storage.v1 import definitions_pb2_grpc as pb_grpc
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.storage.conftest import Connect, StartServer
from tests.storage.test_definitions import stub_for  # noqa: F401 (the fixture)
from tests.storage.test_subscriptions import subscribe as subscribe_events
from tests.storage.test_subscriptions import tails, wait_for


def alert(n: int, *, tenant: str = "acme", rule: str = "hot", event_time: int = 0) -> common.Alert:
    return common.Alert(
        alert_id=f"{n:032x}",
        tenant=tenant,
        rule_id=rule,
        rule_version=1,
        rule_kind="threshold",
        key="sensor-1",
        first_event_time_unix_nanos=event_time or n,
        last_event_time_unix_nanos=event_time or n,
        event_ids=[f"e{n}"],
        detail_json=json.dumps({"value": n}),
    )


@pytest.fixture
def stubs(stub_for: Callable[[str], Any]) -> tuple[Any, Any]:  # noqa: F811 (the fixture)
    """DefinitionService as the gateway and as the processor."""
    return stub_for("gateway"), stub_for("processor")


async def record(processor: Any, *alerts: common.Alert) -> int:
    reply = await processor.StoreEngineOutputs(
        pb.StoreEngineOutputsRequest(alerts=alerts), timeout=10
    )
    return int(reply.alerts_written)


async def read(
    call: Any, done: Callable[[list[str], bool], bool], timeout: float = 10
) -> tuple[list[str], str]:
    ids: list[str] = []
    token, current = "", False
    async with asyncio.timeout(timeout):
        async for message in call:
            assert message.resume_token
            token = message.resume_token
            ids += [a.alert_id[-2:] for a in message.alerts]
            current = current or message.current
            if done(ids, current):
                break
    return ids, token


def watch(gateway: Any, **fields: Any) -> Any:
    fields.setdefault("tenant", "acme")
    fields.setdefault("principal", "ana")
    return gateway.SubscribeAlerts(pb.SubscribeAlertsRequest(**fields))


async def test_alerts_in_record_order_resume_filter_and_tenant(stubs: Any) -> None:
    gateway, processor = stubs
    assert await record(processor, alert(1, event_time=500), alert(2)) == 2
    call = watch(gateway)
    ids, _ = await read(call, lambda ids, current: current)
    assert ids == ["01", "02"]
    # Recorded later but about older events: it still comes, after what was sent.
    await record(processor, alert(3, event_time=1), alert(4, tenant="globex"))
    await record(processor, alert(1, event_time=500))  # a replay: nothing new
    await record(processor, alert(5, rule="cold"))
    ids, token = await read(call, lambda ids, _: len(ids) >= 2)
    assert ids == ["03", "05"]
    call.cancel()
    await record(processor, alert(6), alert(7, rule="cold"))
    ids, _ = await read(watch(gateway, resume_token=token), lambda ids, current: current)
    assert ids == ["06", "07"]
    cold, _ = await read(watch(gateway, rule_id="cold"), lambda ids, current: current)
    assert cold == ["05", "07"]
    late, _ = await read(watch(gateway, start_at_end=True), lambda ids, current: current)
    assert late == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # a token of another rule filter
        await read(watch(gateway, rule_id="cold", resume_token=token), lambda i, c: c)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resume_token" in (caught.value.details() or "")


async def test_an_alert_committed_late_with_a_lower_seq_is_not_passed(
    stubs: Any, engine: AsyncEngine
) -> None:
    gateway, processor = stubs
    call = watch(gateway)
    await read(call, lambda ids, current: current)
    async with engine.connect() as slow:
        await slow.execute(
            text(
                "INSERT INTO alerts (tenant, alert_id, rule_id, rule_version, rule_kind, key,"
                " first_event_nanos, last_event_nanos, event_ids, detail)"
                " VALUES ('acme', :id, 'hot', 1, 'threshold', 'k', 1, 1, '{}', '{}')"
            ),
            {"id": f"{10:032x}"},
        )
        await record(processor, alert(11))
        early = asyncio.ensure_future(read(call, lambda ids, _: bool(ids)))
        await asyncio.sleep(1)
        assert not early.done()  # alert 11 waits for the open insert
        await slow.commit()
    ids, _ = await early
    if ids == ["0a"]:
        ids += (await read(call, lambda ids, _: bool(ids)))[0]
    assert ids == ["0a", "0b"]
    call.cancel()


async def test_alert_and_event_tails_share_the_limit(
    start_server: StartServer, engine: AsyncEngine, connect: Connect, pki_dir: Any
) -> None:
    server = await start_server(engine, subscribe_max_per_principal=1)
    channel = create_channel(
        f"127.0.0.1:{server.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="storage",
        config=service_config(DEFINITION_SERVICE, health_checked=False),
    )
    try:
        alerts = watch(pb_grpc.DefinitionServiceStub(channel))
        await read(alerts, lambda ids, current: current)
        events = subscribe_events(connect(server.port, "gateway"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await events.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        alerts.cancel()
        await wait_for(lambda: tails(server) == 0)
    finally:
        await channel.close()


def result(partition: int, *, tenant: str = "acme", window: str = "per-minute") -> Any:
    return common.WindowResult(
        tenant=tenant,
        window_id=window,
        window_version=1,
        partition=partition,
        group="eu",
        start_unix_nanos=0,
        end_unix_nanos=60_000_000_000,
        revision=0,
        values_json=json.dumps({"orders": partition}),
        watermark_unix_nanos=61_000_000_000,
    )


async def test_window_results_tail_by_window_and_tenant_and_resume(stubs: Any) -> None:
    gateway, processor = stubs
    store = processor.StoreEngineOutputs
    await store(pb.StoreEngineOutputsRequest(window_results=[result(0)]), timeout=10)
    request = pb.SubscribeWindowResultsRequest(
        tenant="acme", principal="ana", window_id="per-minute"
    )
    call = gateway.SubscribeWindowResults(request)
    seen: list[int] = []
    token = ""
    async with asyncio.timeout(10):
        async for message in call:
            token = message.resume_token
            seen += [r.partition for r in message.window_results]
            if len(seen) == 3:
                break
            if message.current:  # then the live ones, another window's and tenant's among them
                batch = [
                    result(1),
                    result(9, window="other"),
                    result(8, tenant="globex"),
                    result(2),
                ]
                await store(pb.StoreEngineOutputsRequest(window_results=batch), timeout=10)
    call.cancel()
    assert seen == [0, 1, 2]
    await store(pb.StoreEngineOutputsRequest(window_results=[result(3)]), timeout=10)
    request.resume_token = token
    async with asyncio.timeout(10):
        async for message in gateway.SubscribeWindowResults(request):
            assert [r.partition for r in message.window_results] == [3]
            break
