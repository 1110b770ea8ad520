"""The processing part of `streammesh bench` (issue 10's speed targets), run after today's phases
on the same stack, with the workload of bench_workload (3 windows, 5 rules, 5 alerts a batch):

1. the engine alone, in process, on one core: services/processor/engine_speed in a process of
   its own (the CLI imports no service internals), over the same documents and events;
2. the windows and rules created for the bench tenant through the gateway's RuleService, then the
   closed loop again with them (type `bench.<run>.proc`): its stored rate over the closed loop's
   without them (same run), and the CPU us/event each service spends on top;
3. an open loop at --processing-rate with event times set by the client (its send time plus an
   offset past what the closed loop left), SubscribeAlerts and SubscribeWindowResults open from
   before it: an alert's latency from the acknowledgement of the batch holding the triggering
   event (for an absence: the batch that moved the watermark past its deadline) to its arrival
   on the subscription; and a window result's latency from the moment the watermark passed the
   window's end, taken as the acknowledgement time of the first batch of the result's partition
   whose event time is >= end + out-of-orderness (the earliest moment the processor can know),
   to its store time (emit_time). A flush event per partition (a type nothing matches) moves
   every watermark past the workload's horizon at the end of phases 2 and 3, so every window
   closes and every absence fires without waiting for the idle timeout.

Phase 3's alerts and window results are checked against bench_workload's reference computed from
its acknowledged batches: a count off (missing or doubled) is a failure, as a lost event is.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.api.gateway.v1 import rules_pb2 as rpb
from streammesh.cli import bench_load as load
from streammesh.cli import bench_workload as workload
from streammesh.cli.bench_phases import CATCH_UP_TIMEOUT, DRAIN_TIMEOUT, Session, closed_phase
from streammesh.cli.bench_stats import latency_summary
from streammesh.cli.errors import describe_rpc_error
from streammesh.streams import jump_hash

__all__ = ["MEASURED", "add_processing_arguments", "processing_phases"]

SECOND = workload.SECOND
MEASURED = ("gateway", "ingest", "processor", "storage", "redis", "postgres", "machine")
RESULTS_TIMEOUT = 60.0
"""Seconds the alerts and window results may take to arrive after the last flush was stored."""
TARGETS = {
    "engine_events_per_s": 200_000,
    "stored_ratio": 0.8,
    "alert_p99_ms": 250,
    "window_result_p99_ms": 1000,
}


def add_processing_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--no-processing", action="store_true",
                       help="skip the processing part (engine alone, closed loop with 3 windows "
                       "and 5 rules, alert and window-result latency)")  # fmt: skip
    bench.add_argument("--processing-rate", type=float, default=5000.0,
                       help="processing open loop: events/s offered (default 5000)")  # fmt: skip
    bench.add_argument("--engine-events", type=int, default=200_000,
                       help="engine alone: events per round (default 200000)")  # fmt: skip
    bench.add_argument("--out-of-orderness-ms", type=int, default=2000,
                       help="the bench processor's watermark lag (default 2000, the "
                       "processor's default); an alert waits for it by design")  # fmt: skip


async def engine_alone(events: int) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.processor.engine_speed", "--json", "--rounds", "3",
        "--events", str(events), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        raise load.BenchError(f"engine alone failed: {err.decode(errors='replace')[-500:]}")
    figures: dict[str, Any] = json.loads(out)
    return figures


async def _define(s: Session, event_type: str) -> list[tuple[str, str]]:
    """The 3 windows and 5 rules, through the gateway as a rule-admin would; (kind, id) of each."""
    calls: list[tuple[str, Message]] = [
        ("CreateWindow", rpb.CreateWindowRequest(definition_json=json.dumps(doc)))
        for doc in workload.windows(event_type)
    ] + [
        ("CreateRule", rpb.CreateRuleRequest(definition_json=json.dumps(doc)))
        for doc in workload.rules(event_type)
    ]
    created = []
    for method, request in calls:
        reply = await getattr(s.client.rules, method)(
            request, metadata=s.client.bearer(), timeout=30
        )
        kind = "window" if method == "CreateWindow" else "rule"
        created.append((kind, getattr(reply, kind).id))
    return created


async def _undefine(s: Session, created: list[tuple[str, str]]) -> None:
    """Disable what _define created, so that later phases (the variants) run without it."""
    for kind, definition_id in created:
        if kind == "window":
            await s.client.rules.SetWindowEnabled(
                rpb.SetWindowEnabledRequest(window_id=definition_id, enabled=False),
                metadata=s.client.bearer(),
                timeout=30,
            )
        else:
            await s.client.rules.SetRuleEnabled(
                rpb.SetRuleEnabledRequest(rule_id=definition_id, enabled=False),
                metadata=s.client.bearer(),
                timeout=30,
            )


def _batches(s: Session, tag: str, size: int) -> list[list[event_pb2.Event]]:
    """Session.events' batches (ids, type, size) with the workload's keys and payloads."""
    batches = s.events("proc", tag, size)
    for t, batch in enumerate(batches):
        rows = workload.batch_payloads(
            size, keys=s.args.keys, offset=t * size, payload_bytes=s.args.payload_bytes
        )
        for event, (key, _, payload) in zip(batch, rows, strict=True):
            event.key, event.payload = key, payload
    return batches


class _TimedBatches:
    """Open-loop templates whose batch k carries one event time: its first send's wall time
    plus `offset_ns` (a resend repeats it, so the idempotent retry stays identical)."""

    def __init__(self, batches: list[list[event_pb2.Event]], id_prefix: str, offset_ns: int):
        self.batches, self.id_prefix, self.offset = batches, id_prefix, offset_ns
        self._events = len(batches[0])
        self.times: dict[int, int] = {}

    @property
    def events(self) -> int:
        return self._events

    def stamp(self, number: int) -> bytes:
        t = self.times.setdefault(number, time.time_ns() + self.offset)
        events = self.batches[number % len(self.batches)]
        for index, event in enumerate(events):
            event.id = f"{self.id_prefix}-{number:0{load.NUMBER_WIDTH}d}-{index:04d}"
            event.event_time.FromNanoseconds(t)
        return gateway_pb2.PublishRequest(events=events).SerializeToString()


async def _flush(s: Session, event_time_ns: int, tag: str) -> float:
    """One event per partition at `event_time_ns`, of a type nothing matches: every watermark
    moves there. The wall time of its acknowledgement."""
    events = [
        event_pb2.Event(id=f"{s.run}{tag}-flush-{p}", key=key, type=f"bench.{s.run}.flush",
                        payload=b"{}", content_type="application/json")
        for p, key in enumerate(workload.flush_keys(s.bench.partitions))
    ]  # fmt: skip
    for event in events:
        event.event_time.FromNanoseconds(event_time_ns)
    await s.client.publish_batch(events)
    return time.time()


RESUMES = 20
"""Times a subscription cut with UNAVAILABLE is resumed from its last token, at most."""


@dataclass
class _Subscription:
    """Items of a live subscription with their arrival wall times."""

    items: list[tuple[Any, float]] = field(default_factory=list)
    current: asyncio.Event = field(default_factory=asyncio.Event)
    error: str = ""
    resumed: list[str] = field(default_factory=list)
    """Why each resume was needed (the status of the cut)."""


async def _follow(open_call: Callable[[str], Any], field_name: str, into: _Subscription) -> None:
    """Read the stream into `into`; cut with UNAVAILABLE, resume from the last token as a client
    would (the API promises no gap and no repeat: the counts check it)."""
    token = ""
    while True:
        call = open_call(token)
        try:
            async for message in call:
                now = time.time()
                into.items.extend((item, now) for item in getattr(message, field_name))
                token = message.resume_token
                if message.current:
                    into.current.set()
            return
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or len(into.resumed) >= RESUMES:
                into.error = describe_rpc_error(error)
                into.current.set()
                return
            into.resumed.append(describe_rpc_error(error))
            await asyncio.sleep(0.2)
        finally:
            call.cancel()


@contextlib.asynccontextmanager
async def _subscribed(s: Session) -> AsyncIterator[tuple[_Subscription, _Subscription]]:
    alerts, results = _Subscription(), _Subscription()

    def alert_call(token: str) -> Any:
        request = rpb.SubscribeAlertsRequest(start_at_end=not token, resume_token=token)
        return s.client.rules.SubscribeAlerts(request, metadata=s.client.bearer())

    def result_call(token: str) -> Any:
        request = rpb.SubscribeWindowResultsRequest(start_at_end=not token, resume_token=token)
        return s.client.rules.SubscribeWindowResults(request, metadata=s.client.bearer())

    tasks = [
        asyncio.create_task(_follow(alert_call, "alerts", alerts)),
        asyncio.create_task(_follow(result_call, "window_results", results)),
    ]
    try:
        async with asyncio.timeout(30):
            await alerts.current.wait()
            await results.current.wait()
        yield alerts, results
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Watermarks:
    """Per partition, the acknowledged batches' event times and ack wall times, to find when the
    watermark (max event time - out-of-orderness) first reached a time."""

    def __init__(self, partitions: int, ooo_ns: int) -> None:
        self.times: list[list[int]] = [[] for _ in range(partitions)]
        self.acks: list[list[float]] = [[] for _ in range(partitions)]
        self.ooo = ooo_ns

    def add(self, partitions: set[int], event_time: int, ack_wall: float) -> None:
        for p in partitions:
            if self.times[p] and event_time <= self.times[p][-1]:
                continue  # not a new maximum: it moved nothing
            self.times[p].append(event_time)
            self.acks[p].append(ack_wall)

    def reached(self, partition: int, t: int) -> float | None:
        """Ack wall time of the first batch that took `partition`'s watermark to >= t."""
        at = bisect.bisect_left(self.times[partition], t + self.ooo)
        return self.acks[partition][at] if at < len(self.acks[partition]) else None


def _ms(values: list[float]) -> dict[str, float]:
    return latency_summary(values)


async def _wait_for(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _open_phase(s: Session, offset_ns: int) -> dict[str, Any]:
    args, tag = s.args, "q"
    rate, prefix, partitions = args.processing_rate, f"{s.run}{tag}", s.bench.partitions
    ooo = args.out_of_orderness_ms * 1_000_000
    timed = _TimedBatches(_batches(s, tag, args.batch_size), prefix, offset_ns)
    print(f"processing open loop: {rate:,.0f} events/s for {args.duration:g}s, subscribed to "
          "alerts and window results", flush=True)  # fmt: skip
    async with _subscribed(s) as (alerts, results):
        before = await load.sample_cpu(s.pids, s.redis)
        ol = await load.open_loop(
            s.publish, s.metadata, [timed], rate=rate, duration=args.duration,
            drain_timeout=DRAIN_TIMEOUT,
        )  # fmt: skip
        acked = [k for k in range(ol.batches) if not math.isnan(ol.ack_wall[k])]
        last = max(timed.times[k] for k in acked) if acked else time.time_ns()
        flush_at = last + workload.HORIZON_NANOS + ooo + SECOND
        flush_ack = await _flush(s, flush_at, tag)
        expected_alerts = {rule: n * len(acked) for rule, n in workload.ALERTS_PER_BATCH.items()}
        partition_of = _partition_map(timed.batches, partitions)
        expected_results = workload.expected_results(
            (
                workload.TimedEvent(event.key, _site(event), timed.times[k])
                for k in acked
                for event in timed.batches[k % len(timed.batches)]
            ),
            partitions,
        )
        first_time = min(timed.times.values())

        def ours_alerts() -> list[tuple[Any, float]]:
            return [(a, at) for a, at in alerts.items if a.event_ids[0].startswith(prefix + "-")]

        def ours_results() -> list[tuple[Any, float]]:
            return [(r, at) for r, at in results.items if r.end_unix_nanos > first_time]

        complete = await _wait_for(
            lambda: (
                (
                    len(ours_alerts()) >= sum(expected_alerts.values())
                    and len(ours_results()) >= sum(expected_results.values())
                )
                or bool(alerts.error or results.error)
            ),
            RESULTS_TIMEOUT,
        )
        drained = await load.wait_drained(s.redis, s.layout, timeout=CATCH_UP_TIMEOUT)
        after = await load.sample_cpu(s.pids, s.redis)
        await asyncio.sleep(1.0)  # anything beyond the reference (doubled) has time to show
        got_alerts, got_results = ours_alerts(), ours_results()
    marks = _Watermarks(partitions, ooo)
    for k in acked:
        marks.add(partition_of[k % len(timed.batches)], timed.times[k], ol.ack_wall[k])
    marks.add(set(range(partitions)), flush_at, flush_ack)
    alert_ms, alert_wm_ms, unmatched = _alert_latencies(got_alerts, ol, prefix, timed, marks)
    result_ms, result_seen_ms = [], []
    for r, arrived in got_results:
        passed = marks.reached(r.partition, r.end_unix_nanos)
        if passed is None:
            continue
        stored = r.emit_time.seconds + r.emit_time.nanos / 1e9
        result_ms.append((stored - passed) * 1000)
        result_seen_ms.append((arrived - passed) * 1000)
    return {
        "offered_eps": rate,
        "events": ol.events,
        "acked": ol.acked,
        "acked_batches": len(acked),
        "publish_ack_ms": _ms(ol.latencies_ms()),
        "caught_up": drained is not None,
        "complete_within_timeout": complete,
        "alerts": _counted(
            [a.rule_id for a, _ in got_alerts],
            [a.alert_id for a, _ in got_alerts],
            expected_alerts,
        ),
        "window_results": _counted(
            [r.window_id for r, _ in got_results if r.revision == 0 and not r.retracted],
            [_identity(r) for r, _ in got_results],
            expected_results,
            other=sum(1 for r, _ in got_results if r.revision or r.retracted),
        ),
        "subscription_errors": [e for e in (alerts.error, results.error) if e],
        "subscription_resumes": {"alerts": alerts.resumed, "window_results": results.resumed},
        "alert_ms": _ms(alert_ms),
        "alert_after_watermark_ms": _ms(alert_wm_ms),
        "alerts_without_trigger": unmatched,
        "window_result_stored_ms": _ms(result_ms),
        "window_result_seen_ms": _ms(result_seen_ms),
        "cpu_us_per_event": load.cpu_per_event(before, after, ol.acked),
        "method": (
            "alert: arrival on SubscribeAlerts minus the ack of the batch holding its last "
            "causing event (absence: the first batch with event time >= deadline + "
            "out-of-orderness); alert after watermark: minus the ack of the first batch of its "
            "partition with event time >= last causing event + out-of-orderness; window "
            "result: emit_time minus the ack of the first batch of its partition with event "
            "time >= end + out-of-orderness; one event time per batch, monotonic"
        ),
    }


def _site(event: event_pb2.Event) -> str:
    site: str = json.loads(event.payload)["site"]
    return site


def _partition_map(batches: list[list[event_pb2.Event]], partitions: int) -> list[set[int]]:
    return [{jump_hash(e.key.encode(), partitions) for e in batch} for batch in batches]


def _identity(r: Any) -> tuple[Any, ...]:
    return (r.window_id, r.window_version, r.partition, r.group, r.start_unix_nanos,
            r.end_unix_nanos, r.revision, r.retracted)  # fmt: skip


def _counted(
    names: list[str], identities: list[Any], expected: dict[str, int], other: int = 0
) -> dict[str, Any]:
    got = Counter(names)
    return {
        "expected": expected,
        "received": {name: got.get(name, 0) for name in expected},
        "distinct": len(set(identities)),
        "total": len(identities),
        "unexpected": other + sum(n for name, n in got.items() if name not in expected),
    }


def _alert_latencies(
    got: list[tuple[Any, float]],
    ol: load.OpenLoopResult,
    prefix: str,
    timed: _TimedBatches,
    marks: _Watermarks,
) -> tuple[list[float], list[float], int]:
    from_ack, from_watermark, unmatched = [], [], 0
    partitions = len(marks.times)
    for alert, arrived in got:
        partition = jump_hash(alert.key.encode(), partitions)
        if alert.rule_kind == "absence":
            deadline = alert.first_event_time_unix_nanos + workload.ABSENCE_WITHIN
            trigger = marks.reached(partition, deadline)
            passed = trigger
        else:
            batch = load.batch_number(alert.event_ids[-1], prefix)
            trigger = None if math.isnan(ol.ack_wall[batch]) else ol.ack_wall[batch]
            passed = marks.reached(partition, alert.last_event_time_unix_nanos)
        if trigger is None or passed is None:
            unmatched += 1
            continue
        from_ack.append((arrived - trigger) * 1000)
        from_watermark.append((arrived - passed) * 1000)
    return from_ack, from_watermark, unmatched


async def processing_phases(s: Session, closed_off: dict[str, Any]) -> dict[str, Any]:
    print(f"engine alone: {s.args.engine_events:,} events, 3 windows + 5 rules", flush=True)
    engine = await engine_alone(s.args.engine_events)
    event_type = f"bench.{s.run}.proc"
    created = await _define(s, event_type)
    try:
        await asyncio.sleep(3.0)  # the processors follow within 2 s (definition_follower)
        ooo = s.args.out_of_orderness_ms * 1_000_000
        closed_on = await closed_phase(
            s, "proc", "p", batches=_batches(s, "p", s.args.closed_batch_size)
        )
        await _flush(s, time.time_ns() + workload.HORIZON_NANOS + ooo + SECOND, "p")
        await load.wait_drained(s.redis, s.layout, timeout=CATCH_UP_TIMEOUT)
        offset = workload.HORIZON_NANOS + ooo + 2 * SECOND  # past the flush: nothing is late
        stored_before = await s.client.count(event_pb2.EventFilter(type=event_type))
        opened = await _open_phase(s, offset)
        stored = await s.client.count(event_pb2.EventFilter(type=event_type)) - stored_before
    finally:
        await _undefine(s, created)
    opened["stored"] = stored
    on, off = closed_on["cpu_us_per_event"], closed_off["cpu_us_per_event"]
    return {
        "engine_alone": engine,
        "closed_loop": closed_on,
        "stored_eps_without": closed_off["stored_eps"],
        "stored_ratio": closed_on["stored_eps"] / closed_off["stored_eps"],
        "processing_cpu_us_per_event": {
            name: None if on.get(name) is None or off.get(name) is None else on[name] - off[name]
            for name in MEASURED
        },
        "open_loop": opened,
        "out_of_orderness_ms": s.args.out_of_orderness_ms,
        "targets": TARGETS,
    }
