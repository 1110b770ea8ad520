"""What the demo's stream-processing part publishes and what must come out of it: payments of a
few accounts inside one tumbling window, with large ones at known places, the window and rule
documents, and the checks of the live results against the payments (pure logic, no I/O).

The window counts, sums and takes the p95 of each account's payments; the rule fires once for
every three payments over LARGE_OVER of one account within the window's span (a threshold rule
with `count`, which starts over after each match), so an account with six large payments gives
two alerts and one with two gives none.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from streammesh.api.common.v1 import definitions_pb2, event_pb2

__all__ = [
    "ACCOUNTS",
    "LARGE_IN_A_ROW",
    "LARGE_OVER",
    "QUANTILE_RELATIVE_ACCURACY",
    "WINDOW_SECONDS",
    "ExpectedAlert",
    "ExpectedWindow",
    "Payment",
    "alert_problems",
    "expected_alerts",
    "expected_windows",
    "lower_quantile",
    "plan_payments",
    "ready_rule_document",
    "rule_document",
    "timed_event",
    "window_document",
    "window_problems",
]

ACCOUNTS = {"acct-1": (40, 6), "acct-2": (30, 2), "acct-3": (25, 3), "acct-4": (20, 0)}
"""Account -> (payments, of which large)."""
LARGE_OVER = 900
LARGE_IN_A_ROW = 3
WINDOW_SECONDS = 2
QUANTILE_RELATIVE_ACCURACY = 0.01
"""The windows' quantile bound as docs/processor-windows.md states it: every p50/p95/p99 within
1 % of the true (lower empirical) quantile. Stated here, not imported: the CLI imports nothing
of a service's internals."""
_NANOS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Payment:
    id: str
    account: str
    time_nanos: int
    amount: int
    """Whole units: sums of integers are exact in the engine's floats, so they compare equal."""


def plan_payments(seed: str, window_start_nanos: int) -> list[Payment]:
    """Every account's payments, spread over [start, start + WINDOW_SECONDS) in event time, in
    event-time order; the large ones at places drawn from `seed`."""
    rng = random.Random(seed)  # noqa: S311 (demo data, not secrets: repeatable from the seed)
    size = WINDOW_SECONDS * _NANOS
    payments = []
    for account, (count, large) in ACCOUNTS.items():
        big = set(rng.sample(range(count), large))
        for i in range(count):
            amount = rng.randint(LARGE_OVER + 1, 4_000) if i in big else rng.randint(5, 600)
            at = window_start_nanos + (i + 1) * size // (count + 1)
            payments.append(Payment(str(uuid.uuid4()), account, at, amount))
    return sorted(payments, key=lambda p: p.time_nanos)


def timed_event(
    event_type: str, key: str, time_nanos: int, payload: dict[str, Any], event_id: str = ""
) -> event_pb2.Event:
    """An event with its event time set (the window and the rule go by event time)."""
    event_time = Timestamp()
    event_time.FromNanoseconds(time_nanos)
    return event_pb2.Event(
        id=event_id or str(uuid.uuid4()),
        key=key,
        type=event_type,
        payload=json.dumps(payload).encode(),
        content_type="application/json",
        event_time=event_time,
        attributes={"source": "streammesh-demo"},
    )


def window_document(window_id: str, event_type: str) -> dict[str, Any]:
    return {
        "id": window_id,
        "event_type": event_type,
        "kind": "tumbling",
        "size": f"{WINDOW_SECONDS}s",
        "group_by": "key",
        "aggregates": [
            {"name": "payments", "fn": "count"},
            {"name": "total", "fn": "sum", "field": "payload.amount"},
            {"name": "p95", "fn": "p95", "field": "payload.amount"},
        ],
    }


def rule_document(rule_id: str, event_type: str) -> dict[str, Any]:
    return {
        "id": rule_id,
        "name": f"{LARGE_IN_A_ROW} payments over {LARGE_OVER} within {WINDOW_SECONDS}s",
        "kind": "threshold",
        "match": {"type": event_type},
        "field": "payload.amount",
        "op": "gt",
        "value": LARGE_OVER,
        "mode": "level",
        "count": LARGE_IN_A_ROW,
        "within": f"{WINDOW_SECONDS}s",
    }


def ready_rule_document(rule_id: str, event_type: str) -> dict[str, Any]:
    """One alert per probe event: its alert proves that the processor of the probe's
    partition runs the definitions written before it (a processor takes them all at once)."""
    return {
        "id": rule_id,
        "kind": "threshold",
        "match": {"type": event_type},
        "field": "payload.probe",
        "op": "gte",
        "value": 1,
        "mode": "level",
    }


def lower_quantile(values: Sequence[float], q: float) -> float:
    """The lower empirical quantile (rank floor(q * (n - 1))), the one DDSketch bounds."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


@dataclass(frozen=True, slots=True)
class ExpectedWindow:
    account: str
    start_nanos: int
    end_nanos: int
    payments: int
    total: int
    p95: float


@dataclass(frozen=True, slots=True)
class ExpectedAlert:
    account: str
    event_ids: tuple[str, ...]
    amounts: tuple[int, ...]


def expected_windows(payments: Sequence[Payment], start_nanos: int) -> dict[str, ExpectedWindow]:
    """Per account, what its window's final result must say."""
    end = start_nanos + WINDOW_SECONDS * _NANOS
    found = {}
    for account in ACCOUNTS:
        amounts = [p.amount for p in payments if p.account == account]
        found[account] = ExpectedWindow(
            account, start_nanos, end, len(amounts), sum(amounts), lower_quantile(amounts, 0.95)
        )
    return found


def expected_alerts(payments: Sequence[Payment]) -> list[ExpectedAlert]:
    """Per account, each run of LARGE_IN_A_ROW large payments in event-time order."""
    alerts = []
    for account in ACCOUNTS:
        large = [p for p in payments if p.account == account and p.amount > LARGE_OVER]
        for start in range(0, len(large) - LARGE_IN_A_ROW + 1, LARGE_IN_A_ROW):
            run = large[start : start + LARGE_IN_A_ROW]
            alerts.append(
                ExpectedAlert(account, tuple(p.id for p in run), tuple(p.amount for p in run))
            )
    return alerts


def window_problems(expected: ExpectedWindow, result: definitions_pb2.WindowResult) -> list[str]:
    """What in one final result disagrees with the payments (nothing: it is right)."""
    where = f"window result of {expected.account}"
    if (result.start_unix_nanos, result.end_unix_nanos) != (
        expected.start_nanos,
        expected.end_nanos,
    ):
        return [f"{where}: covers another span than the payments' window"]
    values = json.loads(result.values_json)
    problems = []
    if values.get("payments") != expected.payments:
        problems.append(f"{where}: count {values.get('payments')}, expected {expected.payments}")
    if values.get("total") != expected.total:
        problems.append(f"{where}: sum {values.get('total')}, expected {expected.total}")
    p95 = values.get("p95")
    bound = QUANTILE_RELATIVE_ACCURACY * expected.p95
    if not isinstance(p95, int | float) or abs(p95 - expected.p95) > bound * (1 + 1e-9):
        problems.append(
            f"{where}: p95 {p95}, expected {expected.p95} within "
            f"{QUANTILE_RELATIVE_ACCURACY:.0%} (the sketch's bound)"
        )
    return problems


def alert_problems(
    expected: Sequence[ExpectedAlert], alerts: Sequence[definitions_pb2.Alert]
) -> list[str]:
    """What the alerts received miss or have too many of, against the expected runs."""
    wanted = {(a.account, a.event_ids) for a in expected}
    got = [(a.key, tuple(a.event_ids)) for a in alerts]
    problems = [
        f"alert of {account} on payments {', '.join(ids)} did not arrive"
        for account, ids in sorted(wanted - set(got))
    ]
    problems += [
        f"unexpected alert of {account} on payments {', '.join(ids)}"
        for account, ids in got
        if (account, ids) not in wanted
    ]
    if len(got) != len(set(got)):
        problems.append("an alert arrived twice")
    return problems
