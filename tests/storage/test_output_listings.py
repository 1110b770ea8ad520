"""ListAlerts, ListWindowResults and ListLateEvents with AIP-160 filters, through storage over
mTLS on real Postgres: each field kind filters what it should, errors point at the offending
token, pages are AIP-158 (sizes coerced, tokens bound to the filter and the principal), and a
tenant's listing never holds another tenant's rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.server import DEFINITION_SERVICE
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.api.storage.v1 import definitions_pb2_grpc as pb_grpc
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.storage.conftest import StartServer
from tests.storage.test_definitions import (  # noqa: F401 (fixtures)
    Definitions,
    gateway,
    processor,
    refused,
    stub_for,
)
from tests.storage.test_schema_registry import field_violations

MINUTE = 60_000_000_000
JAN_1 = 1_767_225_600 * 1_000_000_000
"""2026-01-01T00:00:00Z in nanoseconds."""


def _outputs(tenant: str) -> pb.StoreEngineOutputsRequest:
    alerts = [
        common.Alert(
            alert_id=f"{n:032x}",
            tenant=tenant,
            rule_id="hot" if n % 2 else "cold",
            rule_version=1 + n % 3,
            rule_kind="threshold" if n % 2 else "absence",
            key=f"sensor-{n % 4}",
            first_event_time_unix_nanos=JAN_1 + n * MINUTE,
            last_event_time_unix_nanos=JAN_1 + n * MINUTE + 1,
            event_ids=[f"e{n}"],
            detail_json="{}",
        )
        for n in range(12)
    ]
    results = [
        common.WindowResult(
            tenant=tenant,
            window_id="per-minute" if n % 2 else "per-hour",
            window_version=1,
            partition=n % 3,
            group=f"g{n % 4}",
            start_unix_nanos=JAN_1 + n * MINUTE,
            end_unix_nanos=JAN_1 + (n + 1) * MINUTE,
            revision=n % 2,
            values_json=json.dumps({"total": n * 10, "p95": None if n == 3 else n}),
            watermark_unix_nanos=JAN_1 + (n + 2) * MINUTE,
            retracted=n == 5,
        )
        for n in range(12)
    ]
    late = [
        common.LateEvent(
            tenant=tenant,
            source=common.DEFINITION_KIND_WINDOW if n % 2 else common.DEFINITION_KIND_RULE,
            definition_id="per-minute" if n % 2 else "hot",
            definition_version=1,
            event_id=f"{tenant}-late-{n}",
            event_key=f"k{n % 3}",
            event_time_unix_nanos=JAN_1 + n * MINUTE,
            watermark_unix_nanos=JAN_1 + (n + 5) * MINUTE,
            window_start_unix_nanos=JAN_1 + n * MINUTE if n % 2 else 0,
            window_end_unix_nanos=JAN_1 + (n + 1) * MINUTE if n % 2 else 0,
            reason="beyond allowed lateness" if n % 2 else "at or before the watermark",
        )
        for n in range(10)
    ]
    return pb.StoreEngineOutputsRequest(alerts=alerts, window_results=results, late_events=late)


@pytest.fixture
async def stored(processor: Definitions) -> None:  # noqa: F811
    for tenant in ("t1", "t2"):
        await processor.StoreEngineOutputs(_outputs(tenant))


async def _alerts(gateway: Definitions, text: str, rule_id: str = "") -> list[int]:  # noqa: F811
    page = await gateway.ListAlerts(
        pb.ListAlertsRequest(tenant="t1", principal="ann", filter_expression=text, rule_id=rule_id)
    )
    return [int(alert.alert_id, 16) for alert in page.alerts]


@pytest.mark.usefixtures("stored")
async def test_alert_filters(gateway: Definitions) -> None:  # noqa: F811
    assert await _alerts(gateway, 'rule_id = "hot"') == [11, 9, 7, 5, 3, 1]
    assert await _alerts(gateway, 'rule_id = "hot" AND rule_version >= 2') == [11, 7, 5, 1]
    assert await _alerts(gateway, "rule_kind = ABSENCE AND NOT rule_version = 1") == [10, 8, 4, 2]
    assert await _alerts(gateway, 'key:"sensor-3" OR key = "sensor-0"') == [11, 8, 7, 4, 3, 0]
    assert await _alerts(gateway, 'last_event_time > "2026-01-01T00:09:00Z"') == [11, 10, 9]
    assert await _alerts(gateway, 'first_event_time <= "2026-01-01T00:01:00Z"') == [1, 0]
    assert len(await _alerts(gateway, 'create_time > "2020-01-01T00:00:00Z"')) == 12
    assert await _alerts(gateway, 'alert_id:"*b"') == [11]
    # The request's rule_id and the filter together.
    assert await _alerts(gateway, "rule_version = 3", rule_id="cold") == [8, 2]


async def _results(gateway: Definitions, text: str, window_id: str = "") -> list[int]:  # noqa: F811
    page = await gateway.ListWindowResults(
        pb.ListWindowResultsRequest(
            tenant="t1", principal="ann", window_id=window_id, filter_expression=text
        )
    )
    return [(r.start_unix_nanos - JAN_1) // MINUTE for r in page.window_results]


@pytest.mark.usefixtures("stored")
async def test_window_result_filters(gateway: Definitions) -> None:  # noqa: F811
    # Without a window_id: every window, by window id, then start.
    assert await _results(gateway, "") == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]
    assert await _results(gateway, "", window_id="per-minute") == [1, 3, 5, 7, 9, 11]
    assert await _results(gateway, 'window_id = "per-minute" AND group = "g1"') == [1, 5, 9]
    assert await _results(gateway, 'key = "g2" AND partition = 0') == [6]
    assert await _results(gateway, "revision = 1 AND retracted = false") == [1, 3, 7, 9, 11]
    assert await _results(gateway, "values.total >= 90") == [10, 9, 11]
    assert await _results(gateway, "values.total = 30") == [3]
    assert await _results(gateway, "-values.p95:*") == [3]
    assert await _results(gateway, 'start_time >= "2026-01-01T00:10:00Z"') == [10, 11]
    assert await _results(gateway, 'end_time <= "2026-01-01T00:02:00Z"') == [0, 1]
    assert await _results(gateway, 'watermark_time = "2026-01-01T00:02:00Z"') == [0]


async def _late(
    gateway: Definitions,  # noqa: F811
    text: str,
    *,
    tenant: str = "t1",
    page_size: int = 0,
    token: str = "",
    principal: str = "ann",
) -> pb.ListLateEventsResponse:
    page: pb.ListLateEventsResponse = await gateway.ListLateEvents(
        pb.ListLateEventsRequest(
            tenant=tenant,
            principal=principal,
            filter_expression=text,
            page_size=page_size,
            page_token=token,
        )
    )
    return page


@pytest.mark.usefixtures("stored")
async def test_late_events_with_reason_and_window(gateway: Definitions) -> None:  # noqa: F811
    everything = await _late(gateway, "")
    assert [e.event_id for e in everything.late_events] == [
        f"t1-late-{n}" for n in range(9, -1, -1)
    ]
    missed = everything.late_events[0]
    assert missed.source == common.DEFINITION_KIND_WINDOW
    assert (missed.window_start_unix_nanos, missed.window_end_unix_nanos) == (
        JAN_1 + 9 * MINUTE,
        JAN_1 + 10 * MINUTE,
    )
    assert missed.reason == "beyond allowed lateness" and missed.tenant == "t1"
    windows = await _late(gateway, 'source = "window" AND definition_id = "per-minute"')
    assert [e.event_id[-1] for e in windows.late_events] == ["9", "7", "5", "3", "1"]
    rules = await _late(gateway, 'source = RULE AND event_key = "k0" AND reason:"*watermark"')
    assert [e.event_id for e in rules.late_events] == ["t1-late-6", "t1-late-0"]
    window_start = await _late(gateway, 'window_start_time >= "2026-01-01T00:07:00Z"')
    assert [e.event_id[-1] for e in window_start.late_events] == ["9", "7"]
    assert not (await _late(gateway, 'event_id:"t1*"', tenant="t2")).late_events


@pytest.mark.usefixtures("stored")
async def test_pages_are_bound_to_the_filter_and_the_principal(
    gateway: Definitions,  # noqa: F811
) -> None:
    text = 'source = "window"'
    first = await _late(gateway, text, page_size=2)
    assert len(first.late_events) == 2 and first.next_page_token
    seen = [e.event_id for e in first.late_events]
    token = first.next_page_token
    while token:
        page = await _late(gateway, text, page_size=2, token=token)
        seen += [e.event_id for e in page.late_events]
        token = page.next_page_token
    assert seen == [f"t1-late-{n}" for n in (9, 7, 5, 3, 1)]
    for other in (
        _late(gateway, 'source = "rule"', page_size=2, token=first.next_page_token),
        _late(gateway, text, page_size=2, token=first.next_page_token, principal="bob"),
        _late(gateway, text, page_size=2, token=first.next_page_token, tenant="t2"),
    ):
        error = await refused(other)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(error)[0][0] == "page_token"
    # AIP-158: a page_size above the maximum is lowered, a negative one refused.
    assert len((await _late(gateway, "", page_size=5000)).late_events) == 10
    negative = await refused(_late(gateway, "", page_size=-1))
    assert negative.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("call", "text", "column", "words"),
    [
        ("alerts", 'rule_idd = "x"', 1, 'did you mean "rule_id"'),
        ("alerts", "rule_version = high", 16, "not a number"),
        ("alerts", 'rule_kind = "often"', 13, "threshold, rate, sequence, absence"),
        ("alerts", "last_event_time > 5", 19, "RFC 3339"),
        ("results", 'values.total > "x"', 16, "not a number"),
        ("results", "retracted > true", 11, "compare it with = or !="),
        ("late", "source = window AND (", 22, "unexpected end of filter"),
        ("late", "payload.amount > 1", 1, "fields: definition_id"),
    ],
)
async def test_bad_filters_point_at_the_token(
    gateway: Definitions,  # noqa: F811
    call: str,
    text: str,
    column: int,
    words: str,
) -> None:
    requests = {
        "alerts": lambda: gateway.ListAlerts(
            pb.ListAlertsRequest(tenant="t1", filter_expression=text)
        ),
        "results": lambda: gateway.ListWindowResults(
            pb.ListWindowResultsRequest(tenant="t1", filter_expression=text)
        ),
        "late": lambda: gateway.ListLateEvents(
            pb.ListLateEventsRequest(tenant="t1", filter_expression=text)
        ),
    }
    error = await refused(requests[call]())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at column {column}" in (error.details() or "")
    assert words in (error.details() or "")
    assert field_violations(error)[0][0] == "filter_expression"


@pytest.mark.usefixtures("stored")
async def test_alert_and_result_pages_follow_their_index_order(
    gateway: Definitions,  # noqa: F811
) -> None:
    def alerts(token: str, rule_id: str = "") -> pb.ListAlertsRequest:
        return pb.ListAlertsRequest(
            tenant="t1",
            principal="ann",
            rule_id=rule_id,
            filter_expression="rule_version >= 1",
            page_size=5,
            page_token=token,
        )

    seen: list[str] = []
    page = await gateway.ListAlerts(alerts(""))
    first_token = page.next_page_token
    while True:
        seen += [alert.alert_id for alert in page.alerts]
        if not page.next_page_token:
            break
        page = await gateway.ListAlerts(alerts(page.next_page_token))
    assert seen == [f"{n:032x}" for n in range(11, -1, -1)]
    # The token is bound to the request's rule_id as well as to the filter.
    error = await refused(gateway.ListAlerts(alerts(first_token, rule_id="hot")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    starts: list[tuple[str, int]] = []
    token = ""
    while True:
        results = await gateway.ListWindowResults(
            pb.ListWindowResultsRequest(tenant="t1", principal="ann", page_size=4, page_token=token)
        )
        starts += [(r.window_id, r.start_unix_nanos) for r in results.window_results]
        token = results.next_page_token
        if not token:
            break
    assert starts == sorted(starts) and len(starts) == 12


async def test_a_page_ends_early_within_the_reply_budget(
    start_server: StartServer, engine: AsyncEngine, pki_dir: Path
) -> None:
    """Alerts that name many events: a page stops before the message limit (64 KiB here),
    with a token, and paging on yields every alert once."""
    small = await start_server(engine, max_message_bytes=64 * 1024)
    channels = []

    def stub(who: str) -> Definitions:
        channel = create_channel(
            f"127.0.0.1:{small.port}",
            TlsMaterial.load(pki_dir, who),
            server_name="storage",
            config=service_config(DEFINITION_SERVICE, health_checked=False),
        )
        channels.append(channel)
        return cast(Definitions, pb_grpc.DefinitionServiceStub(channel))

    try:
        processor, reader = stub("processor"), stub("gateway")
        for first in range(0, 10, 4):
            alerts = [
                common.Alert(
                    alert_id=f"{n:032x}",
                    tenant="big",
                    rule_id="rate",
                    rule_version=1,
                    rule_kind="rate",
                    key="k",
                    last_event_time_unix_nanos=n,
                    event_ids=[f"event-{n}-{i:04d}-{'x' * 28}" for i in range(200)],
                    detail_json="{}",
                )
                for n in range(first, min(first + 4, 10))
            ]
            await processor.StoreEngineOutputs(pb.StoreEngineOutputsRequest(alerts=alerts))
        seen: list[str] = []
        sizes: list[int] = []
        token = ""
        while True:
            page = await reader.ListAlerts(
                pb.ListAlertsRequest(tenant="big", principal="p", page_size=100, page_token=token)
            )
            assert page.ByteSize() < 64 * 1024
            sizes.append(len(page.alerts))
            seen += [alert.alert_id for alert in page.alerts]
            token = page.next_page_token
            if not token:
                break
        assert len(sizes) > 1 and all(sizes)
        assert seen == [f"{n:032x}" for n in range(9, -1, -1)]
    finally:
        for channel in channels:
            await channel.close()
