"""The phases of `streammesh bench` on its stack: warm-up, open loops (with ack-to-stored read
back from the store), the closed loop and the raw path, each returning its report section.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from streammesh.api.common.v1 import event_pb2
from streammesh.cli import bench_load as load
from streammesh.cli.bench_backends import backend_cpu_between, backend_pids_of, backends_cpu
from streammesh.cli.bench_raw import MAX_GROUP_EVENTS, RawPath, RawTable, raw_batches
from streammesh.cli.bench_replicas import per_replica_cpu, service_of
from streammesh.cli.bench_stats import latency_summary
from streammesh.cli.stack import StackConfig
from streammesh.client import GatewayClient
from streammesh.streams import StreamLayout

__all__ = [
    "CATCH_UP_TIMEOUT",
    "DRAIN_TIMEOUT",
    "MEASURED",
    "TEMPLATES",
    "Session",
    "closed_phase",
    "open_phase",
    "raw_phase",
    "warm_up",
]

MEASURED = ("gateway", "ingest", "processor", "storage")
TEMPLATES = 4
"""Distinct pre-built batches per phase, reused round-robin with fresh ids."""
DRAIN_TIMEOUT = 30.0
"""Seconds the last acks may take after a phase stopped sending."""
CATCH_UP_TIMEOUT = 120.0
"""Seconds storage may take to catch up with the acknowledged events."""
QUERY_TIMEOUT = 600.0


def _ms(values: list[float]) -> dict[str, float]:
    return latency_summary(values)


@dataclass
class _StoredBack:
    """What reading the open loop's events back gave."""

    latencies_ms: list[float]
    """Per event: its store_time minus its batch's ack time at the client (same clock)."""
    worst_by_batch: dict[int, float]
    distinct: int
    last_store: float


async def _ack_to_stored(
    client: GatewayClient, run: load.OpenLoopResult, event_type: str, id_prefix: str
) -> _StoredBack:
    back = _StoredBack([], {}, 0, math.nan)
    ids = set()
    async with asyncio.timeout(QUERY_TIMEOUT):
        async for stored in client.query_all(event_pb2.EventFilter(type=event_type)):
            ids.add(stored.event.id)
            store_wall = stored.store_time.seconds + stored.store_time.nanos / 1e9
            back.last_store = (
                store_wall if math.isnan(back.last_store) else max(back.last_store, store_wall)
            )
            batch = load.batch_number(stored.event.id, id_prefix)
            if math.isnan(run.ack_wall[batch]):  # stored, but the ack never came (timed out)
                continue
            latency = (store_wall - run.ack_wall[batch]) * 1000
            back.latencies_ms.append(latency)
            back.worst_by_batch[batch] = max(latency, back.worst_by_batch.get(batch, -math.inf))
    back.distinct = len(ids)
    return back


def _timeline(run: load.OpenLoopResult, back: _StoredBack) -> list[dict[str, float]]:
    """Worst publish-ack and ack-to-stored latency per second of the schedule, to see whether a
    tail is spread out or comes in periodic stalls."""
    seconds = max(1, math.ceil(run.intended[-1] - run.started + 1e-9))
    worst = [[-math.inf, -math.inf] for _ in range(seconds)]
    for k, (due, ack) in enumerate(zip(run.intended, run.ack_time, strict=True)):
        row = worst[min(int(due - run.started), seconds - 1)]
        if not math.isnan(ack):
            row[0] = max(row[0], (ack - due) * 1000)
        row[1] = max(row[1], back.worst_by_batch.get(k, -math.inf))
    return [
        {"second": n, "publish_ack_max_ms": a, "ack_to_stored_max_ms": b}
        for n, (a, b) in enumerate(worst)
    ]


def _stamp_cost(template: load.BatchTemplate) -> float:
    started = time.perf_counter()
    for n in range(200):
        template.stamp(n)
    return (time.perf_counter() - started) / 200 / template.events * 1e6


@dataclass(frozen=True)
class Session:
    """What every phase uses: the bench stack, a logged-in client, the raw Publish call."""

    bench: StackConfig
    args: argparse.Namespace
    run: str
    client: GatewayClient
    redis: aioredis.Redis
    publish: load.PublishCall
    metadata: load.Metadata
    pids: dict[str, int | None]
    """Every replica of the MEASURED services by label (bench_replicas.replica_pids)."""

    @property
    def layout(self) -> StreamLayout:
        return StreamLayout(self.bench.stream_prefix, self.bench.partitions)

    def events(self, phase: str, tag: str, size: int) -> list[list[event_pb2.Event]]:
        """TEMPLATES batches of `size` events for `phase`, type `bench.<run>.<phase>`, ids
        `<run><tag>-<batch>-<index>`."""
        return [
            load.make_events(
                id_prefix=f"{self.run}{tag}",
                event_type=f"bench.{self.run}.{phase}",
                count=size,
                payload_bytes=self.args.payload_bytes,
                keys=self.args.keys,
                offset=t * size,
            )
            for t in range(TEMPLATES)
        ]

    async def caught_up(self, phase: str) -> tuple[float | None, int, load.CpuSample]:
        """Wait until the queue is drained (bounded); the loop time it was, the stored count of
        the phase, and a CPU sample taken right then."""
        drained = await load.wait_drained(self.redis, self.layout, timeout=CATCH_UP_TIMEOUT)
        after = await load.sample_cpu(self.pids, self.redis)
        event_filter = event_pb2.EventFilter(type=f"bench.{self.run}.{phase}")
        return drained, await self.client.count(event_filter), after

    async def dead_letters(self) -> int:
        """Entries the processor gave up on so far (all phases)."""
        return int(await self.redis.xlen(f"{self.bench.stream_prefix}:dead"))


async def warm_up(s: Session, tag: str = "w") -> None:
    """The open loop's load for --warmup seconds, not measured: pools grow, caches fill, the
    processor takes its partitions, so the figures describe the steady state, not start-up.
    `tag`: the ids' own, one per warm-up of a run (a restarted stack warms up again)."""
    rate = s.args.rate[0]
    print(f"warm-up: {s.args.warmup:g}s at {rate:,.0f} events/s", flush=True)
    templates = load.request_templates(s.events("warmup", tag, s.args.batch_size))
    await load.open_loop(
        s.publish, s.metadata, templates, rate=rate, duration=s.args.warmup,
        drain_timeout=DRAIN_TIMEOUT,
    )  # fmt: skip
    await load.wait_drained(s.redis, s.layout, timeout=CATCH_UP_TIMEOUT)


async def open_phase(s: Session, rate: float, index: int) -> dict[str, Any]:
    args = s.args
    phase, tag = f"open{index}", f"o{index}"
    print(f"open loop: {rate:,.0f} events/s for {args.duration:g}s, batches of "
          f"{args.batch_size}", flush=True)  # fmt: skip
    templates = load.request_templates(s.events(phase, tag, args.batch_size))
    before = await load.sample_cpu(s.pids, s.redis)
    ol = await load.open_loop(
        s.publish, s.metadata, templates, rate=rate, duration=args.duration,
        drain_timeout=DRAIN_TIMEOUT,
    )  # fmt: skip
    drained, stored, after = await s.caught_up(phase)
    print(f"  {ol.acked:,} acknowledged, {stored:,} stored; reading store times back", flush=True)
    started = time.perf_counter()
    back = await _ack_to_stored(s.client, ol, f"bench.{s.run}.{phase}", f"{s.run}{tag}")
    return {
        "offered_eps": rate,
        "events": ol.events,
        "batches": ol.batches,
        "acked": ol.acked,
        "acked_batches": ol.acked_batches,
        # Over at least the schedule's length: keeping up shows the offered rate.
        "acked_eps": ol.acked / max(ol.last_ack - ol.started, args.duration),
        "publish_ack_ms": _ms(ol.latencies_ms()),
        "send_lag_ms": _ms([lag * 1000 for lag in ol.send_lag if not math.isnan(lag)]),
        "stored": stored,
        "stored_distinct": back.distinct,
        "stored_eps": back.distinct / max(back.last_store - ol.started_wall, args.duration),
        "caught_up": drained is not None,
        "caught_up_after_last_ack_s": None if drained is None else drained - ol.last_ack,
        "dead_letters": await s.dead_letters(),
        "ack_to_stored_ms": _ms(back.latencies_ms),
        "query_back_s": time.perf_counter() - started,
        **_cpu(before, after, ol.acked),
        "timeline": _timeline(ol, back),
    }


async def _storage_backends(s: Session) -> list[int] | None:
    """The Postgres backends of every storage replica (None when none is known)."""
    found: list[int] = []
    for name, pid in s.pids.items():
        if service_of(name) == "storage":
            found += await backend_pids_of(s.bench.database_url, pid) or []
    return found or None


def _cpu(before: load.CpuSample, after: load.CpuSample, events: int) -> dict[str, Any]:
    """The phase's CPU figures: per service, and per replica when a service has several."""
    by_replica = per_replica_cpu(before, after, events)
    return {"cpu_us_per_event": load.cpu_per_event(before, after, events)} | (
        {} if by_replica is None else {"cpu_us_per_replica": by_replica}
    )


async def closed_phase(
    s: Session,
    phase: str = "closed",
    tag: str = "c",
    batches: list[list[event_pb2.Event]] | None = None,
    duration: float | None = None,
) -> dict[str, Any]:
    """The closed loop over `batches` (default `s.events(phase, tag, ...)`: their type must be
    `bench.<run>.<phase>`, their ids unique to the phase) for `duration` (--closed-duration)."""
    args = s.args
    seconds = args.closed_duration if duration is None else duration
    print(f"closed loop{'' if phase == 'closed' else ' ' + phase}: {args.streams} streams x "
          f"{args.window} batches of {args.closed_batch_size} in flight, {seconds:g}s",
          flush=True)  # fmt: skip
    templates = load.request_templates(batches or s.events(phase, tag, args.closed_batch_size))
    backends_before = backends_cpu(await _storage_backends(s))
    before = await load.sample_cpu(s.pids, s.redis)
    cl = await load.closed_loop(
        s.publish, s.metadata, templates, streams=args.streams, window=args.window,
        duration=seconds, drain_timeout=DRAIN_TIMEOUT,
    )  # fmt: skip
    drained, stored, after = await s.caught_up(phase)
    backends_after = backends_cpu(await _storage_backends(s))
    backends_seconds = backend_cpu_between(backends_before, backends_after)
    print(f"  {cl.acked:,} acknowledged, {stored:,} stored", flush=True)
    end = drained if drained is not None else asyncio.get_running_loop().time()
    return {
        "streams": cl.streams,
        "window": cl.window,
        "batch_size": cl.batch_size,
        "duration_s": cl.duration,
        "sent_batches": cl.sent_batches,
        "acked_batches": cl.acked_batches,
        "acked": cl.acked,
        "acked_eps": cl.acked / max(cl.last_ack - cl.started, 1e-9),
        "send_to_ack_ms": _ms(cl.ack_latencies_ms),
        "stored": stored,
        "stored_eps": stored / max(end - cl.started, 1e-9),
        "caught_up": drained is not None,
        "caught_up_after_last_ack_s": None if drained is None else drained - cl.last_ack,
        "dead_letters": await s.dead_letters(),
        "refused": cl.refused,
        **_cpu(before, after, cl.acked),
        # Storage's own backends, per stored event like the raw path's (None when unknown).
        "storage_backends_cpu_us_per_event": (
            None if backends_seconds is None else backends_seconds * 1e6 / max(stored, 1)
        ),
        "stamp_us_per_event": _stamp_cost(templates[0]),
    }


async def raw_phase(
    s: Session, events: int, table: RawTable | None = None, phase: str = "raw", tag: str = "r"
) -> dict[str, Any]:
    """The raw path into `table` (default storage's own), in the bench's `raw` schema (made
    afresh each time) and streams."""
    size = s.args.closed_batch_size
    batches = math.ceil(max(events, size) / size)
    layout = StreamLayout(f"{s.bench.stream_prefix}:raw", s.bench.partitions)
    print(f"raw path{'' if phase == 'raw' else ' ' + phase}: {batches * size:,} events, "
          "packing every command first", flush=True)  # fmt: skip
    made = raw_batches(s.events(phase, tag, size), batches, producer=str(uuid.uuid4()))
    raw_path = await RawPath.prepare(
        redis_url=s.bench.redis_url,
        database_url=s.bench.database_url,
        schema=f"{s.bench.db_schema_prefix}raw",
        layout=layout,
        batches=made,
        table=table,
    )
    try:
        before = await load.sample_cpu(s.pids, s.redis)
        raw = await raw_path.run(timeout=120 + batches * size / 2000)
        after = await load.sample_cpu(s.pids, s.redis)
    finally:
        await raw_path.aclose()
    return {
        "events": raw.events,
        "batches": raw.batches,
        "entries": raw.entries,
        "inserts": raw.inserts,
        "events_per_insert": raw.stored / max(raw.inserts, 1),
        "batch_size": size,
        "stored": raw.stored,
        "counted": raw.counted,
        "seconds": raw.seconds,
        "prepare_s": raw.prepare_seconds,
        "stored_eps": raw.stored_eps,
        "method": (
            "one XADD per (batch, partition), column-wise entry; one consumer task and "
            "connection per partition; consecutive entries grouped up to "
            f"{MAX_GROUP_EVENTS} events per INSERT; storage's INSERT_BATCH_JOINED (text columns "
            "as joined texts) or INSERT_BATCH, chosen as storage does, into storage's table; "
            "integer timestamps; XACK + XTRIM; every command packed before the window"
        ),
        **_cpu(before, after, raw.stored),
        "own_backends_cpu_us_per_event": (
            None
            if raw.backend_cpu_seconds is None
            else raw.backend_cpu_seconds * 1e6 / max(raw.stored, 1)
        ),
    }
