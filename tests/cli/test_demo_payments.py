"""The demo's planned payments and its checks of window results and alerts (pure logic): the
plan puts every payment in the window with the stated large ones, and a result or an alert
that disagrees with the payments is named."""

from __future__ import annotations

import json

from streammesh.api.common.v1 import definitions_pb2
from streammesh.cli.demo_payments import (
    ACCOUNTS,
    LARGE_IN_A_ROW,
    LARGE_OVER,
    WINDOW_SECONDS,
    alert_problems,
    expected_alerts,
    expected_windows,
    lower_quantile,
    plan_payments,
    ready_rule_document,
    rule_document,
    window_document,
    window_problems,
)
from streammesh.definitions.rules import parse_rule
from streammesh.definitions.window_defs import parse_window_def

START = 1_764_000_000 * 10**9
SIZE = WINDOW_SECONDS * 10**9


def test_the_plan_fills_one_window_with_the_stated_large_payments() -> None:
    payments = plan_payments("seed", START)
    again = plan_payments("seed", START)  # the same amounts and times (fresh event ids)
    assert [(p.account, p.time_nanos, p.amount) for p in payments] == [
        (p.account, p.time_nanos, p.amount) for p in again
    ]
    assert all(START <= p.time_nanos < START + SIZE for p in payments)
    assert [p.time_nanos for p in payments] == sorted(p.time_nanos for p in payments)
    for account, (count, large) in ACCOUNTS.items():
        mine = [p for p in payments if p.account == account]
        assert len(mine) == count
        assert sum(p.amount > LARGE_OVER for p in mine) == large
    alerts = expected_alerts(payments)
    wanted = {a: large // LARGE_IN_A_ROW for a, (_, large) in ACCOUNTS.items()}
    assert {a: sum(x.account == a for x in alerts) for a in ACCOUNTS} == wanted
    assert all(all(v > LARGE_OVER for v in a.amounts) for a in alerts)


def test_the_documents_are_what_the_engine_runs() -> None:
    window = parse_window_def({"tenant": "t", **window_document("w", "pay")})
    assert window.size_nanos == SIZE and [a.fn for a in window.aggregates] == [
        "count",
        "sum",
        "p95",
    ]
    for document in (rule_document("r", "pay"), ready_rule_document("p", "probe")):
        assert parse_rule({"tenant": "t", "version": 1, **document}).kind == "threshold"


def _result(account: str, start: int, **values: object) -> definitions_pb2.WindowResult:
    return definitions_pb2.WindowResult(
        group=account,
        start_unix_nanos=start,
        end_unix_nanos=start + SIZE,
        values_json=json.dumps(values),
    )


def test_a_window_result_is_checked_exactly_and_its_p95_within_the_bound() -> None:
    payments = plan_payments("seed", START)
    expected = expected_windows(payments, START)["acct-1"]
    amounts = [p.amount for p in payments if p.account == "acct-1"]
    assert expected.p95 == lower_quantile(amounts, 0.95)
    right = {"payments": expected.payments, "total": expected.total}
    assert window_problems(expected, _result("acct-1", START, **right, p95=expected.p95)) == []
    near = expected.p95 * 1.0099
    assert window_problems(expected, _result("acct-1", START, **right, p95=near)) == []
    far = window_problems(expected, _result("acct-1", START, **right, p95=expected.p95 * 1.02))
    assert len(far) == 1 and "p95" in far[0] and "within 1%" in far[0]
    wrong = window_problems(
        expected,
        _result("acct-1", START, payments=expected.payments - 1, total=0, p95=expected.p95),
    )
    assert [p.split(": ")[1].split(" ")[0] for p in wrong] == ["count", "sum"]
    assert window_problems(expected, _result("acct-1", START + SIZE, **right, p95=1)) == [
        "window result of acct-1: covers another span than the payments' window"
    ]


def test_missing_extra_and_repeated_alerts_are_named() -> None:
    alerts = expected_alerts(plan_payments("seed", START))
    got = [definitions_pb2.Alert(key=a.account, event_ids=a.event_ids) for a in alerts]
    assert alert_problems(alerts, got) == []
    missing = alert_problems(alerts, got[1:])
    assert len(missing) == 1 and "did not arrive" in missing[0]
    extra = definitions_pb2.Alert(key="acct-4", event_ids=["x", "y", "z"])
    assert alert_problems(alerts, [*got, extra]) == [
        "unexpected alert of acct-4 on payments x, y, z"
    ]
    assert alert_problems(alerts, [*got, got[0]]) == ["an alert arrived twice"]
