"""The demo's stream-processing part, through the gateway as a user would do it: define a
tumbling window and a threshold rule, open live subscriptions to window results and alerts,
publish payments whose content fixes what must come out (demo_payments.py), print each result
and alert as it arrives, and check them: counts and sums exact, p95 within the sketch's bound,
exactly the expected alerts.

Two waits make it hold on any stack, whatever its processors' out-of-orderness and idle
timeout (which the gateway does not tell):
- the processors take new definitions within about 2 s, by polling. Until the processor of a
  partition has them it does not count that partition's events, so the payments wait until a
  probe event per account has raised an alert of a probe rule written last (a processor takes
  all definitions written before it at once);
- windows close, and threshold matches are decided, when a partition's watermark (its largest
  event time minus the out-of-orderness) passes them. While waiting, the demo publishes a
  heartbeat per account at the wall-clock time (never before the account's last event), as a
  live source would, until everything expected arrived.
Each wait is bounded, with a message naming what did not happen. The window and rules are
disabled at the end, so the processors stop running them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from streammesh.api.common.v1 import definitions_pb2, event_pb2
from streammesh.api.gateway.v1 import rules_pb2
from streammesh.cli.demo_payments import (
    ACCOUNTS,
    LARGE_IN_A_ROW,
    LARGE_OVER,
    QUANTILE_RELATIVE_ACCURACY,
    WINDOW_SECONDS,
    ExpectedWindow,
    alert_problems,
    expected_alerts,
    expected_windows,
    plan_payments,
    ready_rule_document,
    rule_document,
    timed_event,
    window_document,
    window_problems,
)
from streammesh.cli.errors import describe_rpc_error
from streammesh.client import GatewayClient

__all__ = ["ProcessingCheckFailed", "ProcessingReport", "run_processing_demo"]

_HEARTBEAT_SECONDS = 0.25
_PROBE_EVERY_SECONDS = 0.5
_CALL_TIMEOUT = 30


class ProcessingCheckFailed(RuntimeError):
    """What came out of the window or the rule disagrees with the payments published."""


@dataclass(frozen=True)
class ProcessingReport:
    windows: int
    payments: int
    alerts: dict[str, int]
    """Account -> alerts of the rule (the accounts with any)."""
    ready_seconds: float
    results_seconds: float
    """From the last payment's acknowledgement until the last expected result or alert."""

    def lines(self) -> list[str]:
        return [
            f"window results  {self.windows} windows of {WINDOW_SECONDS}s ({self.payments} "
            f"payments) closed live: counts and sums exact, p95 within "
            f"{QUANTILE_RELATIVE_ACCURACY:.0%}",
            f"alerts          {sum(self.alerts.values())} live ("
            + ", ".join(f"{account} {n}" for account, n in sorted(self.alerts.items()))
            + f"), each on its {LARGE_IN_A_ROW} payments over {LARGE_OVER}",
            f"processing      definitions running after {self.ready_seconds:.1f}s; results "
            f"within {self.results_seconds:.1f}s of the last ack",
        ]


@dataclass
class _Live:
    """What the two subscriptions delivered so far; `changed` is set on every delivery."""

    results: list[definitions_pb2.WindowResult] = field(default_factory=list)
    alerts: list[definitions_pb2.Alert] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    current: int = 0
    """Subscriptions that reached their `current` marker (live from there)."""
    failure: BaseException | None = None


async def _follow(
    messages: AsyncIterator[
        rules_pb2.SubscribeWindowResultsResponse | rules_pb2.SubscribeAlertsResponse
    ],
    live: _Live,
) -> None:
    try:
        async for message in messages:
            if isinstance(message, rules_pb2.SubscribeWindowResultsResponse):
                live.results.extend(message.window_results)
            else:
                live.alerts.extend(message.alerts)
            live.current += message.current
            live.changed.set()
    except grpc.aio.AioRpcError as error:
        live.failure = error
        live.changed.set()


@contextlib.asynccontextmanager
async def _subscribed(client: GatewayClient, window_id: str) -> AsyncIterator[_Live]:
    """Window results of `window_id` and the tenant's alerts, from now on, until the block
    ends; entered once both streams are live."""
    live = _Live()
    tasks = [
        asyncio.create_task(
            _follow(
                client.subscribe_window_results(
                    rules_pb2.SubscribeWindowResultsRequest(window_id=window_id, start_at_end=True)
                ),
                live,
            )
        ),
        asyncio.create_task(
            _follow(
                client.subscribe_alerts(rules_pb2.SubscribeAlertsRequest(start_at_end=True)), live
            )
        ),
    ]
    try:
        await _until(
            live, lambda: live.current == 2, 30, lambda: "the live subscriptions did not start"
        )
        yield live
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until(
    live: _Live,
    done: Callable[[], bool],
    timeout: float,
    failure: Callable[[], str],
    every: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Wait until `done()`, awaiting `every()` at each heartbeat; past `timeout`, fail with
    the message `failure()` gives then."""
    deadline = time.monotonic() + timeout
    while not done():
        if live.failure is not None:
            raise live.failure
        if time.monotonic() > deadline:
            raise ProcessingCheckFailed(f"{failure()} within {timeout:.0f}s")
        if every is not None:
            await every()
        live.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.changed.wait(), _HEARTBEAT_SECONDS)


def _clock(nanos: int) -> str:
    return datetime.fromtimestamp(nanos / 1e9, tz=UTC).strftime("%H:%M:%S.%f")[:-3]


class _Publisher:
    """Publishes the demo's events and heartbeats, keeping each account's latest event time."""

    def __init__(self, client: GatewayClient, event_type: str) -> None:
        self._client = client
        self.type = event_type
        self.latest = dict.fromkeys(ACCOUNTS, 0)

    async def send(self, events: list[event_pb2.Event]) -> None:
        for event in events:
            at = event.event_time.ToNanoseconds()
            self.latest[event.key] = max(self.latest[event.key], at)
        reply = await self._client.publish_batch(events)
        if reply.accepted != len(events):
            raise ProcessingCheckFailed(f"gateway accepted {reply.accepted} of {len(events)}")

    async def heartbeat(self) -> None:
        """One event per account at the wall-clock time, never before its last one: the
        partitions' watermarks follow the clock, as with a live source."""
        now = time.time_ns()
        await self.send(
            [
                timed_event(f"{self.type}.heartbeat", account, max(now, latest + 1), {})
                for account, latest in self.latest.items()
            ]
        )


async def _define(
    client: GatewayClient, kind: str, document: dict[str, object], created: list[tuple[str, str]]
) -> None:
    """Create version 1 of a rule or window; `created` keeps (kind, id) for `_disable`."""
    noun = kind.capitalize()
    await getattr(client.rules, f"Create{noun}")(
        getattr(rules_pb2, f"Create{noun}Request")(definition_json=json.dumps(document)),
        metadata=client.bearer(),
        timeout=_CALL_TIMEOUT,
    )
    created.append((kind, str(document["id"])))


async def _disable(client: GatewayClient, created: list[tuple[str, str]]) -> None:
    for kind, definition_id in created:
        noun = kind.capitalize()
        await getattr(client.rules, f"Set{noun}Enabled")(
            getattr(rules_pb2, f"Set{noun}EnabledRequest")(
                **{f"{kind}_id": definition_id, "enabled": False}
            ),
            metadata=client.bearer(),
            timeout=_CALL_TIMEOUT,
        )


async def _wait_until_running(
    live: _Live, publisher: _Publisher, ready_rule: str, timeout: float
) -> None:
    """Probe every account's partition until its processor alerts on the probe rule."""
    waiting = set(ACCOUNTS)
    probed_at = 0.0

    def settled() -> bool:
        waiting.difference_update(a.key for a in live.alerts if a.rule_id == ready_rule)
        return not waiting

    async def probe() -> None:
        nonlocal probed_at
        if time.monotonic() - probed_at >= _PROBE_EVERY_SECONDS:
            probed_at = time.monotonic()
            now = time.time_ns()
            probes = [
                timed_event(
                    f"{publisher.type}.probe", a, max(now, publisher.latest[a] + 1), {"probe": 1}
                )
                for a in sorted(waiting)
            ]
            await publisher.send(probes)
        await publisher.heartbeat()

    await _until(
        live,
        settled,
        timeout,
        lambda: (
            "the processors did not take up the new window and rules (no alert on a "
            f"probe event of {', '.join(sorted(waiting))})"
        ),
        probe,
    )


async def run_processing_demo(
    client: GatewayClient,
    run_id: str,
    *,
    say: Callable[[str], None] = print,
    timeout: float = 30.0,
) -> ProcessingReport:
    """The stream-processing part (module docstring); `timeout` bounds each wait."""
    event_type = f"demo.{run_id}.payment"
    window_id, rule_id, ready_id = (f"demo-{run_id}-{n}" for n in ("amounts", "large", "ready"))
    created: list[tuple[str, str]] = []
    try:
        await _define(client, "window", window_document(window_id, event_type), created)
        say(
            f"window {window_id}: tumbling {WINDOW_SECONDS}s per account, count, sum and p95 "
            "of payload.amount"
        )
        await _define(client, "rule", rule_document(rule_id, event_type), created)
        say(
            f"rule {rule_id}: {LARGE_IN_A_ROW} payments over {LARGE_OVER} of one account "
            f"within {WINDOW_SECONDS}s"
        )
        await _define(client, "rule", ready_rule_document(ready_id, f"{event_type}.probe"), created)
        return await _run(client, event_type, window_id, rule_id, ready_id, say, timeout)
    finally:
        try:
            await _disable(client, created)
        except grpc.aio.AioRpcError as error:  # reported, without hiding why the demo ended
            say(f"could not disable the demo's definitions: {describe_rpc_error(error)}")
        else:
            if created:
                say(f"disabled {', '.join(f'{kind} {name}' for kind, name in created)}")


async def _run(
    client: GatewayClient,
    event_type: str,
    window_id: str,
    rule_id: str,
    ready_id: str,
    say: Callable[[str], None],
    timeout: float,
) -> ProcessingReport:
    publisher = _Publisher(client, event_type)
    async with _subscribed(client, window_id) as live:
        say("subscribed to window results and alerts (live)")
        started = time.perf_counter()
        await _wait_until_running(live, publisher, ready_id, timeout)
        ready_seconds = time.perf_counter() - started

        size = WINDOW_SECONDS * 1_000_000_000
        start = (time.time_ns() + size // 4) // size * size + size  # the next whole window
        payments = plan_payments(f"{window_id}@{start}", start)
        windows = expected_windows(payments, start)
        alerts = expected_alerts(payments)
        say(
            f"publishing {len(payments)} payments of {len(ACCOUNTS)} accounts in "
            f"[{_clock(start)}, {_clock(start + size)}), {len(alerts)} runs of "
            f"{LARGE_IN_A_ROW} over {LARGE_OVER} among them"
        )
        await publisher.send(
            [
                timed_event(event_type, p.account, p.time_nanos, {"amount": p.amount}, p.id)
                for p in payments
            ]
        )
        acked = time.perf_counter()
        shown = _Shown(say, rule_id, windows)

        def arrived() -> bool:
            shown.show(live)
            finals = {r.group for r in live.results if r.revision == 0}
            ours = [a for a in live.alerts if a.rule_id == rule_id]
            return finals >= set(windows) and len(ours) >= len(alerts)

        await _until(
            live,
            arrived,
            timeout,
            lambda: (
                f"not all {len(windows)} window results and {len(alerts)} alerts arrived "
                f"(results of {', '.join(sorted({r.group for r in live.results})) or 'none'}, "
                f"{sum(a.rule_id == rule_id for a in live.alerts)} alerts)"
            ),
            publisher.heartbeat,
        )
        results_seconds = time.perf_counter() - acked
        await asyncio.sleep(_HEARTBEAT_SECONDS)  # one more round: a repeat would show up
        shown.show(live)
        mine = [a for a in live.alerts if a.rule_id == rule_id]
        problems = alert_problems(alerts, mine)
    for result in live.results:
        expected = windows.get(result.group)
        if expected is None:
            problems.append(f"window result of unknown group {result.group!r}")
        else:
            problems += window_problems(expected, result)
    if problems:
        raise ProcessingCheckFailed("; ".join(problems))
    return ProcessingReport(
        len(windows),
        len(payments),
        dict(Counter(a.key for a in mine)),
        ready_seconds,
        results_seconds,
    )


class _Shown:
    """Prints each result and alert once, as it arrives."""

    def __init__(
        self, say: Callable[[str], None], rule_id: str, windows: dict[str, ExpectedWindow]
    ) -> None:
        self._say = say
        self._rule = rule_id
        self._windows = windows
        self._results = 0
        self._alerts = 0

    def show(self, live: _Live) -> None:
        for result in live.results[self._results :]:
            values = json.loads(result.values_json)
            expected = self._windows.get(result.group)
            exact = f" (exact {expected.p95:,.0f})" if expected is not None else ""
            self._say(
                f"  window [{_clock(result.start_unix_nanos)}, {_clock(result.end_unix_nanos)}) "
                f"{result.group}: {values['payments']} payments, sum {values['total']:,.0f}, "
                f"p95 {values['p95']:,.1f}{exact}"
            )
        self._results = len(live.results)
        for alert in live.alerts[self._alerts :]:
            if alert.rule_id == self._rule:
                amounts = json.loads(alert.detail_json).get("values", [])
                self._say(
                    f"  alert  {alert.key}: payments of {', '.join(f'{v:,.0f}' for v in amounts)} "
                    f"at {_clock(alert.first_event_time_unix_nanos)}-"
                    f"{_clock(alert.last_event_time_unix_nanos)}"
                )
        self._alerts = len(live.alerts)
