"""Live delivery of SubscribeEvents at 5,000 events/s with 20 subscribers, polling (each
subscription reads Postgres on its own every 0.2 s, as storage did) against the shared feeds
(one read per table and tenant, woken by storage's commits), in one run: p50/p99 from a batch's
StoreEvents acknowledgement to each subscriber's receipt of its events, and the CPU of the
storage's Postgres backends (from /proc, so Postgres must run on this machine), beside a phase
that only writes. An in-process storage server over mTLS, four writers (commits out of order),
subscribers by tenant, by key and by filter expression; every event checked delivered once.
Uses a database of its own on the local Postgres (its statistics are the run's alone: the
transactions and rows read per second are printed), dropped after.

    .venv/bin/python scripts/bench_subscribe_live.py [--seconds 10] [--rate 5000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg

from services.storage.server import SERVICE, StorageDeps, create_event_pool, create_server
from services.storage.settings import StorageSettings
from services.storage.sql import MIGRATIONS_PACKAGE
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.mesh import TlsMaterial, create_channel, service_config
from streammesh.mesh.pki import init_pki
from streammesh.mesh.postgres import create_engine, ensure_database, load_migrations, migrate

SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432"
DOMAIN = "bench.streammesh"
SUBSCRIBERS = 20
KEYS = 10
_TICKS = os.sysconf("SC_CLK_TCK")


def _selections() -> list[dict[str, Any]]:
    """10 by tenant, 6 by key, 4 by a filter expression (that every event matches)."""
    by_key = [{"filter": event_pb2.EventFilter(keys=[f"k{n}"])} for n in range(6)]
    by_expression = [{"filter_expression": "payload.n >= 0"} for _ in range(4)]
    return [{} for _ in range(10)] + by_key + by_expression


async def _subscribe(port: int, pki: Path, subscribers: int, control: Connection) -> None:
    """The subscribers' side (a process of its own, so that decoding 20 streams does not hold
    up the server's loop): the first receipt time of each event per subscriber, and repeats."""
    channel = create_channel(
        f"127.0.0.1:{port}",
        TlsMaterial.load(pki, "gateway"),
        server_name="storage",
        config=service_config(SERVICE, health_checked=False),
    )
    reader = storage_pb2_grpc.StorageServiceStub(channel)
    received: list[dict[str, float]] = [{} for _ in range(subscribers)]
    repeats = 0
    loop = asyncio.get_running_loop()

    async def consume(call: Any, n: int, first: asyncio.Future[None]) -> None:
        nonlocal repeats
        async for message in call:
            now = time.perf_counter()  # CLOCK_MONOTONIC: comparable with the writer's
            if message.current and not first.done():
                first.set_result(None)
            for stored in message.events:
                if stored.event.id in received[n]:
                    repeats += 1
                received[n].setdefault(stored.event.id, now)

    calls, ready, tasks = [], [], []
    for n, fields in enumerate(_selections()[:subscribers]):
        request = storage_pb2.SubscribeEventsRequest(
            tenant="acme", principal=f"sub{n}", start_at_end=True, **fields
        )
        calls.append(reader.SubscribeEvents(request))
        ready.append(loop.create_future())
        tasks.append(asyncio.ensure_future(consume(calls[-1], n, ready[-1])))
    await asyncio.wait_for(asyncio.gather(*ready), 60)
    control.send("ready")
    await loop.run_in_executor(None, control.recv)  # "stop"
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    control.send((received, repeats, time.process_time()))


async def _write(
    port: int, pki: Path, name: str, rate: float, seconds: float, size: int, writers: int
) -> tuple[dict[str, float], float]:
    """The writers' side (a process of its own, as the processor is): `writers` concurrent
    StoreEvents callers at `rate` events/s together; each event's acknowledgement time, and
    how long the writing took."""
    channel = create_channel(
        f"127.0.0.1:{port}",
        TlsMaterial.load(pki, "processor"),
        server_name="storage",
        config=service_config(SERVICE, health_checked=False),
    )
    stub = storage_pb2_grpc.StorageServiceStub(channel)
    acked: dict[str, float] = {}

    async def write(w: int) -> None:
        interval = size * writers / rate
        start = time.perf_counter()
        for b in range(int(seconds / interval)):
            await asyncio.sleep(max(0.0, start + b * interval - time.perf_counter()))
            ids = [f"{name}-{w}-{b}-{i}" for i in range(size)]
            events = [
                event_pb2.QueuedEvent(
                    event=event_pb2.Event(
                        id=i, key=f"k{(b + j) % KEYS}", type="t", payload=b'{"n": 1}'
                    ),
                    producer="bench",
                )
                for j, i in enumerate(ids)
            ]
            for event in events:
                event.ingest_time.GetCurrentTime()
            batch = event_pb2.QueuedBatch(events=events, partition=w, tenant="acme")
            await stub.StoreEvents(storage_pb2.StoreEventsRequest(batch=batch), timeout=30)
            acked.update(dict.fromkeys(ids, time.perf_counter()))

    start = time.perf_counter()
    await asyncio.gather(*(write(w) for w in range(writers)))
    took = time.perf_counter() - start
    await channel.close()
    return acked, took


def _writer_process(*args: Any, control: Connection) -> None:
    control.send(asyncio.run(_write(*args)))


def _subscriber_process(port: int, pki: Path, subscribers: int, control: Connection) -> None:
    asyncio.run(_subscribe(port, pki, subscribers, control))


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def _backend_cpu(conn: asyncpg.Connection, application: str) -> dict[int, float]:
    """CPU seconds so far of each Postgres backend of `application`."""
    pids = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application
    )
    found = {}
    for (pid,) in pids:
        seconds = _cpu_seconds(pid)
        if seconds is not None:
            found[pid] = seconds
    return found


async def _database_load(conn: asyncpg.Connection, database: str) -> tuple[int, int]:
    """Transactions and rows read (returned by scans) so far in `database`."""
    row = await conn.fetchrow(
        "SELECT xact_commit + xact_rollback, tup_returned + tup_fetched FROM pg_stat_database"
        " WHERE datname = $1",
        database,
    )
    assert row is not None
    return int(row[0]), int(row[1])


async def _phase(
    name: str, subscribers: int, shared: bool, database: str, pki: Path, args: argparse.Namespace
) -> None:
    url = f"{SERVER}/{database}"
    schema = "storage"
    application = f"bench-live-{uuid.uuid4().hex[:6]}"
    settings = StorageSettings(
        tls_dir=pki,
        trust_domain=DOMAIN,
        port=0,
        db_schema=schema,
        database_url=url,
        subscribe_shared_feeds=shared,
        subscribe_poll_seconds=0.5 if shared else 0.2,
    )
    engine = create_engine(url, schema=schema, application_name=application)
    pool = await create_event_pool(url, schema=schema, application_name=application)
    server = create_server(settings, StorageDeps(engine=engine, pool=pool))
    await server.start()
    context = multiprocessing.get_context("spawn")
    monitor = await asyncpg.connect(f"{SERVER.replace('+asyncpg', '')}/postgres")
    load = await _database_load(monitor, database)
    loop = asyncio.get_running_loop()
    control, child_end = context.Pipe()
    child = context.Process(
        target=_subscriber_process, args=(server.port, pki, subscribers, child_end), daemon=True
    )
    try:
        if subscribers:
            child.start()
            assert await loop.run_in_executor(None, control.recv) == "ready"
        before = await _backend_cpu(monitor, application)
        storage_cpu = time.process_time()

        wall = time.perf_counter()
        writer_end, writer_child = context.Pipe()
        writer = context.Process(
            target=_writer_process,
            # Ids unique to the phase: a repeated id is stored once, so it would not be sent.
            args=(server.port, pki, application, args.rate, args.seconds, args.batch, args.writers),
            kwargs={"control": writer_child},
            daemon=True,
        )
        writer.start()
        acked, writing = await loop.run_in_executor(None, writer_end.recv)
        writer.join(10)
        await asyncio.sleep(3)  # the last ones arrive (later ones count as missed)
        wall = time.perf_counter() - wall
        storage_cpu = time.process_time() - storage_cpu
        after = await _backend_cpu(monitor, application)
        received: list[dict[str, float]] = []
        repeats, client_cpu = 0, 0.0
        if subscribers:
            control.send("stop")
            received, repeats, client_cpu = await loop.run_in_executor(None, control.recv)
    finally:
        if child.is_alive():
            child.join(10)
        await server.stop(0)
        await pool.close()
        await engine.dispose()  # the backends exit: their statistics are flushed
        await asyncio.sleep(0.5)  # the backends' last statistics
        ended = await _database_load(monitor, database)
        await monitor.close()
    cpu = sum(after.values()) - sum(before.get(pid, 0.0) for pid in after)
    per_thousand = 1000 / max(1, len(acked))
    transactions, rows = ((e - b) * per_thousand for e, b in zip(ended, load, strict=True))
    line = (
        f"{name:<13} stored {len(acked) / writing:5.0f} ev/s; Postgres per 1000 events:"
        f" {transactions:4.0f} xact, {rows / 1000:5.1f}k rows read, CPU {cpu * per_thousand * 1e3:4.0f}"
        f" ms; CPU storage {storage_cpu / wall:4.2f} core"
    )
    if subscribers:
        latencies = sorted(
            (times[i] - acked[i]) * 1e3
            for n, times in enumerate(received)
            for i in times
            if i in acked and _wanted(n, i)
        )
        expected = sum(1 for n in range(subscribers) for i in acked if _wanted(n, i))
        p99 = latencies[int(len(latencies) * 0.99)] if latencies else float("nan")
        for n, times in enumerate(received):
            missing = [i for i in acked if _wanted(n, i) and i not in times]
            if missing:
                print(f"  subscriber {n} missed {len(missing)}, as {missing[:3]}")
        line += (
            f", subscribers {client_cpu / wall:4.2f}"
            f"  delivery p50 {statistics.median(latencies or [float('nan')]):5.1f} ms"
            f" p99 {p99:6.1f} ms"
            f" ({len(latencies)}/{expected} once, {repeats} twice)"
        )
    print(line, flush=True)


def _wanted(subscriber: int, event_id: str) -> bool:
    """Whether subscriber n's selection takes the event (keys by the writer's formula)."""
    if not 10 <= subscriber < 16:
        return True
    _, _, b, j = event_id.rsplit("-", 3)
    return (int(b) + int(j)) % KEYS == subscriber - 10


async def main(args: argparse.Namespace) -> None:
    database = f"bench_live_{uuid.uuid4().hex[:6]}"
    await ensure_database(f"{SERVER}/{database}")
    engine = create_engine(f"{SERVER}/{database}", schema="storage", application_name="bench")
    await migrate(engine, schema="storage", migrations=load_migrations(MIGRATIONS_PACKAGE))
    await engine.dispose()
    print(
        f"{args.rate:g} events/s offered for {args.seconds:g} s per phase, {args.subscribers}"
        " subscribers (shared machine figures)"
    )
    try:
        with tempfile.TemporaryDirectory() as directory:
            pki = Path(directory)
            init_pki(pki, trust_domain=DOMAIN)
            for _ in range(args.repeat):
                await _phase("polling", args.subscribers, False, database, pki, args)
                await _phase("shared feeds", args.subscribers, True, database, pki, args)
            await _phase("writes only", 0, True, database, pki, args)
    finally:
        conn = await asyncpg.connect(f"{SERVER.replace('+asyncpg', '')}/postgres")
        try:
            await conn.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
        finally:
            await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--repeat", type=int, default=1, help="polling/feeds pairs")
    parser.add_argument("--subscribers", type=int, default=SUBSCRIBERS, help="at most 20")
    parser.add_argument("--writers", type=int, default=4, help="concurrent StoreEvents callers")
    parser.add_argument("--batch", type=int, default=100, help="events per StoreEvents")
    asyncio.run(main(parser.parse_args()))
