"""`streammesh bench --soak SECONDS`: hold SOAK_FRACTION of the closed loop's maximum as an open
loop for SECONDS, and report whether the stack stays flat: each service's RSS after the soak's
warm-up and at its end (growth, trend, max), open file descriptors, Redis used_memory, any error
(a failed stream, recycled streams, dead letters, ERROR or WARNING lines in the services' logs, a
process gone), and that every acknowledged event was stored exactly once.

The closed loop's maximum is its stored rate (end to end, catch-up included), not its ack rate:
an open loop above what storage sustains grows the backlog without bound, and the soak would then
measure a queue filling up instead of a steady state.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from streammesh.api.common.v1 import event_pb2
from streammesh.cli import bench_load as load
from streammesh.cli.bench_phases import CATCH_UP_TIMEOUT, DRAIN_TIMEOUT, Session
from streammesh.cli.bench_report import num
from streammesh.cli.bench_resources import (
    ResourceSample,
    ResourceSampler,
    mib,
    redis_memory_line,
    resource_summary,
)
from streammesh.cli.bench_stats import latency_summary
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.stack import START_ORDER, log_file, process_alive

__all__ = [
    "FLAT_GROWTH_PCT",
    "SOAK_FRACTION",
    "default_soak_warmup",
    "render_soak",
    "soak_phase",
    "soak_problems",
    "soak_rate",
]

SOAK_FRACTION = 0.7
"""Of the closed loop's stored rate: issue 8's load for the soak."""
FLAT_GROWTH_PCT = 10.0
"""Issue 8's 'flat': at most this RSS growth per service from the end of the soak's warm-up."""
_COUNT_WINDOW = 15
"""Seconds of ingest time per CountEvents of the soak's events (~300k events at 20k/s)."""
_LOG_EXAMPLES = 3
"""Log lines kept per service, to say what the errors were."""


def default_soak_warmup(seconds: float) -> float:
    """A tenth of the soak, at most a minute: long enough for pools and allocator arenas to grow
    to the soak's load, so the RSS start is the steady state's."""
    return min(60.0, seconds / 10)


def soak_rate(closed: Mapping[str, Any], given: float | None) -> tuple[float, str]:
    """The offered rate and where it came from."""
    if given is not None:
        return given, "--soak-rate"
    basis = float(closed["stored_eps"])
    return SOAK_FRACTION * basis, f"{SOAK_FRACTION:.0%} of the closed loop's stored {basis:,.0f}/s"


@dataclass
class _LogWatch:
    """What the services write to their logs from now on."""

    offsets: dict[str, int]

    @classmethod
    def start(cls, s: Session) -> _LogWatch:
        offsets = {}
        for name in START_ORDER:
            try:
                offsets[name] = log_file(s.bench, name).stat().st_size
            except OSError:
                offsets[name] = 0
        return cls(offsets)

    def read(self, s: Session) -> dict[str, dict[str, Any]]:
        """Per service: counts of ERROR (and CRITICAL), WARNING and non-JSON lines (tracebacks,
        gRPC core messages) written since start, and the first few of them."""
        out = {}
        for name, offset in self.offsets.items():
            counts = {"errors": 0, "warnings": 0, "other": 0}
            examples: list[str] = []
            try:
                with log_file(s.bench, name).open("rb") as handle:
                    handle.seek(offset)
                    lines = handle.read().decode(errors="replace").splitlines()
            except OSError:
                lines = []
            for line in filter(str.strip, lines):
                kind = _line_kind(line)
                if kind is None:
                    continue
                counts[kind] += 1
                if len(examples) < _LOG_EXAMPLES:
                    examples.append(line[:300])
            out[name] = {**counts, "examples": examples}
        return out


def _line_kind(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return "other"
    level = entry.get("level") if isinstance(entry, dict) else None
    if level in ("ERROR", "CRITICAL"):
        return "errors"
    return "warnings" if level == "WARNING" else None


async def _count_stored(s: Session, since: float) -> tuple[int | None, str | None]:
    """The events stored with an ingest time (their event_time: the bench sets none) from
    `since`, the wall time before the soak's first send (to the microsecond: a whole-second
    floor would take in the closed loop's last events when the raw path between them is
    short), to a minute from now, counted through the gateway by windows, so that no count scans more than a window's rows
    within the gateway's deadline for a storage call; a window that still runs out of time is
    counted in halves. The windows tile the span, so each event is counted once. No type
    filter: with one, the planner ANDs the type index into the bitmap and scans every soak row
    per window. The span holds only the soak's events: the closed loop was stored (so
    ingested) before it began, the raw path writes elsewhere, and ingest stamps on this
    machine's clock; anything else there would show as more stored than sent, not hide a loss."""

    def stamp(seconds: float) -> timestamp_pb2.Timestamp:
        micros = round(seconds * 1_000_000)
        return timestamp_pb2.Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)

    async def count(start: float, end: float) -> int:
        window = event_pb2.EventFilter(start_time=stamp(start), end_time=stamp(end))
        try:
            return await s.client.count(window)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED or end - start < 2:
                raise
            middle = math.floor((start + end) / 2)
            return await count(start, middle) + await count(middle, end)

    later = range(math.floor(since) + _COUNT_WINDOW, math.ceil(time.time()) + 60, _COUNT_WINDOW)
    edges: list[float] = [since, *later]
    edges.append(math.floor(edges[-1]) + _COUNT_WINDOW)
    try:
        return sum([await count(a, b) for a, b in itertools.pairwise(edges)]), None
    except grpc.aio.AioRpcError as error:
        return None, describe_rpc_error(error)


def _window_seconds(seconds: float) -> float:
    """The length of one row of the soak's timeline: a minute, or a tenth of a shorter soak."""
    return max(1.0, min(60.0, seconds / 10))


def _timeline(
    ol: load.OpenLoopResult, samples: Sequence[ResourceSample], seconds: float
) -> list[dict[str, Any]]:
    """Per window of the schedule: events/s acknowledged, publish-ack p99 and max of the batches
    due in it, the max Redis used_memory and each service's RSS at its last sample."""
    width = _window_seconds(seconds)
    rows = []
    for k in range(max(1, math.ceil(seconds / width - 1e-9))):
        start, end = ol.started + k * width, ol.started + min((k + 1) * width, seconds)
        due = [
            n
            for n, t in enumerate(ol.intended)
            if start <= t < end and not math.isnan(ol.ack_time[n])
        ]
        latency = latency_summary([(ol.ack_time[n] - ol.intended[n]) * 1000 for n in due])
        inside = [s for s in samples if start <= s.at < end]
        redis = [s.redis_used_memory for s in inside if s.redis_used_memory is not None]
        rows.append(
            {
                "start_s": k * width,
                "acked_eps": len(due) * ol.batch_size / (end - start),
                "publish_ack_p99_ms": latency["p99"],
                "publish_ack_max_ms": latency["max"],
                "redis_used_memory_max_bytes": max(redis) if redis else None,
                "rss_bytes": dict(inside[-1].rss) if inside else {},
            }
        )
    return rows


async def soak_phase(
    s: Session, sampler: ResourceSampler, *, rate: float, basis: str, seconds: float,
    warmup: float, batch_size: int,
) -> dict[str, Any]:  # fmt: skip
    """The soak's open loop for `seconds` (its first `warmup` seconds not counted in the RSS
    growth), then until storage caught up; its report section."""
    print(f"soak: {seconds:g}s open loop at {rate:,.0f} events/s ({basis}), batches of "
          f"{batch_size}; RSS counted from {warmup:g}s in", flush=True)  # fmt: skip
    templates = load.request_templates(s.events("soak", "s", batch_size))
    logs, dead_before = _LogWatch.start(s), await s.dead_letters()
    started_wall = time.time()
    before = await load.sample_cpu(s.pids, s.redis)
    ol: load.OpenLoopResult | None = None
    failure = None
    try:
        ol = await load.open_loop(
            s.publish, s.metadata, templates, rate=rate, duration=seconds,
            drain_timeout=DRAIN_TIMEOUT, back_off=True,
        )  # fmt: skip
    except load.BenchError as error:  # reported with what the soak saw until then
        failure, ol = str(error), error.partial
    drained = await load.wait_drained(s.redis, s.layout, timeout=CATCH_UP_TIMEOUT)
    after = await load.sample_cpu(s.pids, s.redis)
    stored, count_failure = await _count_stored(s, started_wall)
    samples = sampler.of("soak")
    steady = samples
    if ol is not None:
        steady = [s for s in samples if ol.started + warmup <= s.at <= ol.started + seconds]
        steady = steady if len(steady) >= 2 else samples
    acked = None if ol is None else ol.acked
    print(f"  {num(acked)} acknowledged, {num(stored)} stored", flush=True)
    services = resource_summary(steady, interval=sampler.interval)["services"]
    growth = [v["rss_growth_pct"] for v in services.values() if v["rss_growth_pct"] is not None]
    return {
        "seconds": seconds,
        "warmup_s": warmup,
        "offered_eps": rate,
        "rate_basis": basis,
        "batch_size": batch_size,
        "events": None if ol is None else ol.events,
        "batches": None if ol is None else ol.batches,
        "acked": acked,
        "acked_batches": None if ol is None else ol.acked_batches,
        "acked_eps": None if ol is None else ol.acked / max(ol.last_ack - ol.started, seconds),
        "stored": stored,
        "caught_up": drained is not None,
        "caught_up_after_last_ack_s": (
            None if drained is None or ol is None else drained - ol.last_ack
        ),
        "publish_ack_ms": latency_summary([] if ol is None else ol.latencies_ms()),
        "cpu_us_per_event": load.cpu_per_event(before, after, acked or 0),
        "steady": {
            "samples": len(steady),
            "from_s": None if ol is None or not steady else steady[0].at - ol.started,
            "to_s": None if ol is None or not steady else steady[-1].at - ol.started,
            "services": services,
        },
        "flat": bool(growth) and max(growth) <= FLAT_GROWTH_PCT,
        "flat_growth_pct_max": FLAT_GROWTH_PCT,
        "errors": {
            "stream_failed": failure,
            "count_failed": count_failure,
            "recycled_streams": None if ol is None else ol.recycled,
            "refusals_waited_out": None if ol is None else ol.refused_codes,
            "refusals_wait_s": None if ol is None else ol.refused_wait,
            "unacknowledged_batches": None if ol is None else ol.batches - ol.acked_batches,
            "dead_letters": await s.dead_letters() - dead_before,
            "logs": logs.read(s),
            "processes_gone": [
                name for name, pid in sampler.pids.items() if not pid or not process_alive(pid)
            ],
        },
        "timeline": [] if ol is None else _timeline(ol, samples, seconds),
    }


def soak_problems(soak: Mapping[str, Any]) -> list[str]:
    """An acknowledged event not stored exactly once, or a soak that could not tell. Event ids
    are unique per event and the store's primary key, so when every batch was acknowledged and
    the stored count of the soak's type equals the events sent, each one is stored exactly once.
    With batches never acknowledged (a failed stream, acks later than the drain timeout) those
    may or may not be stored: fewer stored than acknowledged is a loss, more cannot be told
    apart by counts."""
    acked, stored, events = soak["acked"], soak["stored"], soak["events"]
    failed = soak["errors"]["stream_failed"]
    if stored is None:
        return [f"NOT CHECKED: soak: the stored events could not be counted "
                f"({soak['errors']['count_failed']})"]  # fmt: skip
    late = "" if soak["caught_up"] else " (storage had not caught up)"
    if acked is None:
        return [
            f"NOT CHECKED: soak: the Publish stream failed before any result ({failed}); {stored} stored"
        ]
    if stored < acked or (acked == events and stored != acked):
        return [
            f"NOT STORED EXACTLY ONCE: soak: {events} sent, {acked} acknowledged, {stored} stored{late}"
        ]
    if acked != events:
        why = f"the Publish stream failed ({failed})" if failed else "acks came too late"
        return [
            f"NOT CHECKED: soak: {why}; {events - acked} events never acknowledged, so exactly-once cannot "
            f"be checked by counts ({acked} acknowledged, {stored} stored)"
        ]
    return []


def _errors_line(errors: Mapping[str, Any]) -> list[str]:
    logs = errors["logs"]
    codes = errors["refusals_waited_out"] or {}
    refusals = ", ".join(f"{count} {code}" for code, count in codes.items())
    counted = {
        kind: sum(entry[kind] for entry in logs.values())
        for kind in ("errors", "warnings", "other")
    }
    lines = [
        f"  errors: stream failed: {errors['stream_failed'] or 'no'}; stored count failed: "
        f"{errors['count_failed'] or 'no'}; recycled streams "
        f"{num(errors['recycled_streams'])}; refusals waited out {refusals or 'none'} "
        f"({num(errors['refusals_wait_s'], '.0f', 's')}); "
        f"unacknowledged batches "
        f"{num(errors['unacknowledged_batches'])}; dead letters {errors['dead_letters']}; "
        f"processes gone: {', '.join(errors['processes_gone']) or 'none'}",
        f"  service logs during the soak: {counted['errors']} ERROR, {counted['warnings']} "
        f"WARNING, {counted['other']} other lines",
    ]
    for name, entry in logs.items():
        lines += [f"    {name}: {example}" for example in entry["examples"]]
    return lines


def render_soak(soak: Mapping[str, Any], resources: Mapping[str, Any]) -> list[str]:
    """The soak's table: RSS and fds per service, Redis memory, errors, the timeline."""
    steady = soak["steady"]
    met = "(met)" if soak["flat"] else "(MISSED)"
    lines = [
        "",
        f"soak {soak['seconds']:g}s at {num(soak['offered_eps'])} events/s offered "
        f"({soak['rate_basis']}), batches of {soak['batch_size']}",
        f"  {num(soak['acked'])} of {num(soak['events'])} events acknowledged "
        f"({num(soak['acked_eps'])}/s), {num(soak['stored'])} stored; caught up "
        f"{num(soak['caught_up_after_last_ack_s'], '.2f', 's')} after the last ack; "
        f"whole-machine CPU {num(soak['cpu_us_per_event']['machine'], '.1f')} us/event",
        f"  publish-ack ms  p50 {num(soak['publish_ack_ms']['p50'], '.1f')}  p99 "
        f"{num(soak['publish_ack_ms']['p99'], '.1f')}  p99.9 "
        f"{num(soak['publish_ack_ms']['p99_9'], '.1f')}  max "
        f"{num(soak['publish_ack_ms']['max'], '.1f')}",
        f"  RSS from {num(steady['from_s'], '.0f', 's')} (after the warm-up) to "
        f"{num(steady['to_s'], '.0f', 's')}, MiB:",
        f"    {'service':<11}{'start':>9}{'end':>9}{'growth':>9}{'max':>9}{'trend/min':>11}"
        f"{'fds start':>11}{'end':>6}{'max':>6}",
    ]
    for name, entry in steady["services"].items():
        rss, fds = entry["rss_bytes"], entry["fds"]
        lines.append(
            f"    {name:<11}{mib(rss['first']):>9}{mib(rss['last']):>9}"
            f"{num(entry['rss_growth_pct'], '+.1f', '%'):>9}{mib(rss['max']):>9}"
            f"{num(entry['rss_trend_pct_per_min'], '+.2f', '%'):>11}"
            f"{num(fds['first']):>11}{num(fds['last']):>6}{num(fds['max']):>6}"
        )
    lines += [
        f"  flat (RSS growth <= {soak['flat_growth_pct_max']:g}% per service after the warm-up) "
        f"{met}",
        redis_memory_line("soak", resources),
        *_errors_line(soak["errors"]),
    ]
    if soak["timeline"]:
        names = list(soak["timeline"][0]["rss_bytes"])
        lines.append(
            f"    {'from s':>7}{'acked/s':>9}{'p99 ms':>8}{'max ms':>8}{'redis MiB':>10}  RSS MiB "
            + " ".join(f"{name:>9}" for name in names)
        )
        for row in soak["timeline"]:
            lines.append(
                f"    {row['start_s']:>7.0f}{num(row['acked_eps']):>9}"
                f"{num(row['publish_ack_p99_ms'], '.1f'):>8}{num(row['publish_ack_max_ms'], '.1f'):>8}"
                f"{mib(row['redis_used_memory_max_bytes']):>10}          "
                + " ".join(f"{mib(row['rss_bytes'].get(name)):>9}" for name in names)
            )
    return lines
