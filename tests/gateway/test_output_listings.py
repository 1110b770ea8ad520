"""The filtered output listings through the gateway and the CLI: `streammesh late-events`,
`streammesh alerts` and `streammesh window results` with a FILTER, as tables and --json, a
refused filter printed again with a caret; the roles of ListLateEvents (analyst and rule-admin
read, a producer may not)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from services.storage.server import DEFINITION_SERVICE
from streammesh.api.gateway.v1 import rules_pb2
from streammesh.api.gateway.v1 import rules_pb2_grpc as rules_grpc
from streammesh.api.storage.v1 import definitions_pb2
from streammesh.api.storage.v1 import definitions_pb2_grpc as definitions_grpc
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.gateway.conftest import Stack
from tests.gateway.test_query_api import _cli, _cli_config
from tests.gateway.test_rules import People, people  # noqa: F401 (the module fixture)
from tests.gateway.test_two_tenants_everywhere import late_event
from tests.storage.test_output_subscriptions import alert, result


@pytest.fixture(scope="module")
async def tenant(stack: Stack, people: People) -> str:  # noqa: F811 (the imported fixture)
    """Tenant A's name, with two late events, two alerts and a window result stored."""
    run = people.by_name["a-analyst"].username.rsplit("-", 1)[1]
    tenant = f"ra-{run}"
    channel = create_channel(
        f"127.0.0.1:{stack.storage_port}",
        TlsMaterial.load(stack.pki_dir, "processor"),
        server_name="storage",
        config=service_config(DEFINITION_SERVICE, health_checked=False),
    )
    try:
        await definitions_grpc.DefinitionServiceStub(channel).StoreEngineOutputs(
            definitions_pb2.StoreEngineOutputsRequest(
                alerts=[alert(n, tenant=tenant, event_time=n) for n in (1, 2)],
                window_results=[result(3, tenant=tenant)],
                late_events=[late_event(n, tenant=tenant, window="per-minute") for n in (1, 2)],
            ),
            timeout=10,
        )
    finally:
        await channel.close()
    return tenant


async def test_late_events_by_role(stack: Stack, people: People, tenant: str) -> None:  # noqa: F811
    rules = rules_grpc.RuleServiceStub(stack.gateway_channel)
    request = rules_pb2.ListLateEventsRequest(filter_expression='event_id = "per-minute-late-2"')
    for who in ("a-analyst", "a-rules"):
        reply = await rules.ListLateEvents(request, metadata=people.by_name[who].bearer())
        assert [(e.tenant, e.reason) for e in reply.late_events] == [
            (tenant, "beyond allowed lateness")
        ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rules.ListLateEvents(request, metadata=people.by_name["a-producer"].bearer())
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_cli_filters_listings_and_points_at_a_bad_filter(
    stack: Stack,
    people: People,  # noqa: F811
    tenant: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _cli_config(stack, people.by_name["a-analyst"], tmp_path)
    text = 'source = "window" AND event_time < "1970-01-01T00:00:00.000000003Z"'
    assert await _cli(config, "late-events", text) == 0
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["event", "time"]
    assert [row.split()[-1] for row in rows] == ["per-minute-late-1"]
    assert "window per-minute v1 [00:00:00Z, 00:01:00Z)" in rows[0]

    assert await _cli(config, "late-events", "--json", "--limit", "1") == 0
    page = json.loads(capsys.readouterr().out)
    assert [e["event_id"] for e in page["late_events"]] == ["per-minute-late-2"]
    assert page["next_page_token"]

    assert await _cli(config, "alerts", "--json", f'alert_id = "{1:032x}"') == 0
    assert [a["tenant"] for a in json.loads(capsys.readouterr().out)["alerts"]] == [tenant]
    assert await _cli(config, "window", "results", "-", "partition = 3", "--json") == 0
    results = json.loads(capsys.readouterr().out)["window_results"]
    assert [r["partition"] for r in results] == [3]

    assert await _cli(config, "late-events", "source = window AND reason = 5") == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "reason is a string" in err
    assert err.splitlines()[-2:] == ["  source = window AND reason = 5", "  " + " " * 29 + "^"]
