"""Scenario: long-lived publishing across many connection ages, on real processes.

Ingest and storage recycle their connections every ~5 s (grpc max connection age, 1 s grace),
the gateway's listener every ~6 s, and the gateway recycles its clients' Publish streams at
8 s. For a minute one `GatewayClient.publish` stream sends 2,000 events/s, beside the fault
load generator's PublishBatch producer and its own Publish stream producer.

Proves: no batch fails and none is given up; every acknowledged event is stored exactly once and
in per-key order; the gateway's ingest streams were resumed and the client's stream recycled
several times (counted from the gateway's log); unary calls ride the connection ages out without
an error; and the memory of every service stays flat while it happens (VmRSS).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from streammesh.api.common.v1 import event_pb2
from streammesh.cli.stack import START_ORDER, StartError
from streammesh.client import GatewayClient
from tests.faults.harness import FaultStack
from tests.faults.invariant import check_invariant
from tests.faults.load import LoadReport, Metadata, keys_over_partitions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SECONDS = 60.0  # (ages halved from the first version's 120 s run: as many recycles)
RATE = 2_000
BATCH = 100
RSS_FROM = 30.0
"""RSS is compared from this mark (start-up, pools and caches warm) to the end."""
RSS_BOUND = {"gateway": 0.02, "ingest": 0.02}
"""The services that carry the streams and resend: within 2%. The others hold no per-stream
state; storage drifts up by about 2% between 30 s and 120 s of this load with or without
connection ages (measured: +1.96% with no max age set, +1.38% and +1.92% with them), so they
get 4% here. Only growth is bounded: a shrinking RSS leaks nothing."""
OTHER_RSS_BOUND = 0.04

AGES = {
    "ingest": {
        "STREAMMESH_INGEST_MAX_CONNECTION_AGE_SECONDS": "5",
        "STREAMMESH_INGEST_MAX_CONNECTION_AGE_GRACE_SECONDS": "1",
    },
    "storage": {
        "STREAMMESH_STORAGE_MAX_CONNECTION_AGE_SECONDS": "5",
        "STREAMMESH_STORAGE_MAX_CONNECTION_AGE_GRACE_SECONDS": "1",
    },
    "gateway": {
        "STREAMMESH_GATEWAY_MAX_CONNECTION_AGE_SECONDS": "6",
        "STREAMMESH_GATEWAY_PUBLISH_STREAM_MAX_AGE_SECONDS": "8",
        "STREAMMESH_GATEWAY_MAX_CONNECTION_AGE_GRACE_SECONDS": "18",
    },
}


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def log_messages(path: Path, offset: int) -> list[str]:
    with path.open("rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
    messages = []
    for line in lines:
        try:
            messages.append(str(json.loads(line).get("msg", "")))
        except json.JSONDecodeError:
            messages.append(line)
    return messages


async def test_a_one_minute_stream_across_many_connection_ages(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    for name, env in AGES.items():
        await stack.restart(name, env)
    gateway_log = stack.log_file("gateway")
    log_offset = gateway_log.stat().st_size
    pids = {name: stack.pid(name) for name in START_ORDER}
    assert all(pids.values()), pids

    run = uuid.uuid4().hex[:10]
    keys = keys_over_partitions(run, stack.layout, 4)
    books = LoadReport(event_type=f"age.{run}")
    interval = BATCH / RATE
    started = time.monotonic()

    async def batches() -> AsyncIterator[list[event_pb2.Event]]:
        # Paced by the clock (batch k at t0 + k*interval), so a recycle's pause does not
        # lower the rate offered.
        for number in range(round(SECONDS / interval)):
            delay = started + number * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            events = []
            for slot in range(BATCH):
                key = keys[(number * BATCH + slot) % len(keys)]
                event_id = f"{run}-{number}-{slot}"
                books.order.setdefault(key, []).append(event_id)
                events.append(event_pb2.Event(id=event_id, key=key, type=books.event_type))
            yield events

    rss: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}

    async def sample_rss() -> None:
        while True:
            at = time.monotonic() - started
            for name, pid in pids.items():
                assert pid is not None
                rss[name].append((at, vm_rss_kib(pid)))
            await asyncio.sleep(5.0)

    async def stream() -> int:
        async with GatewayClient(
            stack.config.address("gateway"), stack.config.pki_dir / "ca.pem"
        ) as client:
            client.access_token = dict(producer)["authorization"].removeprefix("Bearer ")
            async for ack in client.publish(batches()):
                books.acked.update(ack.event_ids)
                books.batches_acked += 1
            return client.recycled_streams

    sampler = asyncio.create_task(sample_rss())
    others = stack.load(producer, producers=2, streaming=1, batch_size=16, interval=0.05)
    try:
        recycled, other_report = await asyncio.gather(stream(), others.run(duration=SECONDS))
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    seconds = time.monotonic() - started
    for name, pid in pids.items():
        assert pid is not None
        rss[name].append((seconds, vm_rss_kib(pid)))

    result = await check_invariant(stack.config, books, redis_client, timeout=60)
    other_result = await check_invariant(stack.config, other_report, redis_client, timeout=30)
    messages = log_messages(gateway_log, log_offset)
    resumes = sum("resuming" in m for m in messages)
    recycles = sum("recycling a Publish stream" in m for m in messages)
    gave_up = [m for m in messages if "giving up" in m]
    growth = {}
    for name, series in rss.items():
        mark = next(kib for at, kib in series if at >= RSS_FROM)
        growth[name] = (mark, series[-1][1], (series[-1][1] - mark) / mark)
    print(
        f"\n[connection age] {len(books.sent)} events in {seconds:.1f}s "
        f"({len(books.acked) / seconds:,.0f} events/s acknowledged); ingest streams resumed "
        f"{resumes}x, client streams recycled {recycles}x (SDK re-opened {recycled}x); "
        f"invariant {result.summary()}; other producers {other_report.summary()}, "
        f"invariant {other_result.summary()}; RSS KiB at {RSS_FROM:.0f}s -> end: "
        + ", ".join(f"{n} {a} -> {b} ({g:+.2%})" for n, (a, b, g) in growth.items())
        + "; series: "
        + json.dumps({n: [kib for _, kib in s] for n, s in rss.items()})
    )
    assert books.acked == books.sent, "every batch of the long stream acknowledged"
    assert not gave_up, gave_up
    assert not other_report.given_up and not other_report.errors, other_report.summary()
    # Several connection ages crossed on both hops.
    assert resumes >= 6, f"ingest streams resumed only {resumes}x"
    assert recycled >= 5 and recycles >= recycled + other_report.streams_recycled
    assert other_report.streams_recycled >= 3
    # Still the same processes: nothing was restarted to get through.
    assert {name: stack.pid(name) for name in pids} == pids
    for name, (mark, end, change) in growth.items():
        bound = RSS_BOUND.get(name, OTHER_RSS_BOUND)
        assert change <= bound, f"{name} grew {change:+.2%} ({mark} -> {end} KiB)"


async def start_when_port_is_free(stack: FaultStack, name: str, timeout: float = 15.0) -> None:
    """Start `name` again on its port. Right after a SIGKILL the port can stay taken for a
    moment (seen once in this test on the shared machine), so a taken port is retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await stack.start(name)
            return
        except StartError as error:
            if "is taken" not in str(error) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_stream_rides_out_ingest_restarts(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    """Ingest drained and restarted (SIGTERM), then killed (SIGKILL) and started again, under
    one client stream: the gateway resumes on the new process and the client sees no error."""
    # Starting a service takes seconds on this shared machine: allow the gateway longer than
    # its default 10 s of resuming.
    await stack.restart(
        "gateway",
        {
            "STREAMMESH_GATEWAY_PUBLISH_RESUME_SECONDS": "30",
            "STREAMMESH_GATEWAY_PUBLISH_RESUME_ATTEMPTS": "20",
        },
    )
    gateway_log = stack.log_file("gateway")
    log_offset = gateway_log.stat().st_size
    run = uuid.uuid4().hex[:10]
    keys = keys_over_partitions(run, stack.layout, 2)
    books = LoadReport(event_type=f"restart.{run}")
    stop = asyncio.Event()

    async def batches() -> AsyncIterator[list[event_pb2.Event]]:
        number = 0
        while not stop.is_set():
            events = []
            for slot in range(BATCH):
                key = keys[(number * BATCH + slot) % len(keys)]
                event_id = f"{run}-{number}-{slot}"
                books.order.setdefault(key, []).append(event_id)
                events.append(event_pb2.Event(id=event_id, key=key, type=books.event_type))
            number += 1
            yield events
            await asyncio.sleep(0.1)

    async def stream() -> None:
        async with GatewayClient(
            stack.config.address("gateway"), stack.config.pki_dir / "ca.pem"
        ) as client:
            client.access_token = dict(producer)["authorization"].removeprefix("Bearer ")
            async for ack in client.publish(batches()):
                books.acked.update(ack.event_ids)

    async def faults() -> None:
        await asyncio.sleep(3)
        await asyncio.to_thread(stack.stop, "ingest")  # SIGTERM: drain, then exit
        await stack.start("ingest")
        await asyncio.sleep(3)
        stack.signal("ingest", signal.SIGKILL)
        assert await stack.wait_exit("ingest", 10)
        await start_when_port_is_free(stack, "ingest")
        await asyncio.sleep(3)
        stop.set()

    await asyncio.wait_for(asyncio.gather(stream(), faults()), timeout=120)
    result = await check_invariant(stack.config, books, redis_client, timeout=30)
    messages = log_messages(gateway_log, log_offset)
    resumes = sum("resuming" in m for m in messages)
    print(f"\n[ingest restarts] ingest streams resumed {resumes}x; invariant {result.summary()}")
    assert books.acked == books.sent
    assert resumes >= 2
    assert not [m for m in messages if "giving up" in m]
