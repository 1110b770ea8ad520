"""`streammesh bench`: the id-stamped batch templates (fast), and one tiny run of the whole bench on
its own stack with this test's database, schema prefix and stream prefix (slow).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import dataclasses
import json
import math
import os
import random
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from services.storage.sql import (
    INSERT_BATCH,
    INSERT_BATCH_JOINED,
    PG_EPOCH_SECONDS,
    TEXT_SEPARATOR,
)
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.cli import bench_raw
from streammesh.cli.bench import add_bench_command, cmd_bench
from streammesh.cli.bench_backends import backend_cpu_between, backends_cpu
from streammesh.cli.bench_columns import RawEvent, decode_group, encode_entry
from streammesh.cli.bench_load import (
    BenchError,
    _sequence_field,
    batch_number,
    closed_loop,
    make_events,
    open_loop,
    request_templates,
)
from streammesh.cli.bench_raw import RawPath, raw_batches
from streammesh.cli.bench_setup import bench_stack_config, drop_bench_data
from streammesh.cli.bench_stats import latency_summary
from streammesh.cli.stack import process_alive
from streammesh.mesh.errors import ResourceExhausted
from streammesh.refusals import publish_refusal, recycled
from streammesh.streams import StreamLayout
from tests.bench.configs import bench_test_config
from tests.conftest import run_sql

OPEN = ("open_loops.0", "open_loops.1")
LATENCIES = [
    *(f"{ol}.{name}" for ol in OPEN for name in ("publish_ack_ms", "ack_to_stored_ms")),
    "closed_loop.send_to_ack_ms",
]
FIGURES = [
    *(f"{ol}.{name}" for ol in OPEN for name in ("offered_eps", "acked_eps", "stored_eps")),
    "closed_loop.acked_eps",
    "closed_loop.stored_eps",
    "closed_loop.caught_up_after_last_ack_s",
    "raw.stored_eps",
    "raw.inserts",
    "raw.events_per_insert",
    "raw.prepare_s",
    "raw.own_backends_cpu_us_per_event",
    "closed_loop.storage_backends_cpu_us_per_event",
    "mesh_over_raw",
    "mesh_over_raw_cpu",
    "loadgen.stamp_us_per_event",
    "machine.cores",
    *(f"{lat}.{q}" for lat in LATENCIES for q in ("p50", "p90", "p99", "p99_9", "max", "count")),
    *(
        f"{phase}.cpu_us_per_event.{process}"
        for phase in (*OPEN, "closed_loop", "raw")
        for process in (
            "gateway",
            "ingest",
            "processor",
            "storage",
            "loadgen",
            "redis",
            "postgres",
            "total",
            "machine",
        )
    ),
]
FACTS = [
    "machine.redis.appendonly",
    "machine.redis.appendfsync",
    "machine.postgres.fsync",
    "machine.postgres.synchronous_commit",
]


def _dig(report: dict[str, Any], path: str) -> Any:
    value: Any = report
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _events(size: int) -> list[event_pb2.Event]:
    return make_events(
        id_prefix="abc123o", event_type="bench.t", count=size, payload_bytes=96, keys=10, offset=0
    )


def test_stamped_requests_parse_with_unique_ids_and_sizes() -> None:
    (template,) = request_templates([_events(250)])
    first = gateway_pb2.PublishRequest.FromString(_sequence_field(1) + template.stamp(0))
    later = gateway_pb2.PublishRequest.FromString(_sequence_field(300) + template.stamp(12345))
    assert (first.sequence, later.sequence) == (1, 300)
    assert [len(e.payload) for e in later.events] == [96] * 250
    ids = [e.id for e in (*first.events, *later.events)]
    assert len(set(ids)) == 500
    assert {batch_number(e.id, "abc123o") for e in later.events} == {12345}
    assert later.events[7].key == first.events[7].key and later.events[7].type == "bench.t"


def _raw_event(n: int, payload: bytes) -> RawEvent:
    return RawEvent(
        id=f"id-{n}", key=f"k\u00e9y-{n % 3}", type="t", event_time=n * 1_000_003 - 10**15,
        event_time_nanos=n % 1000, payload=payload, content_type="application/json",
        attributes='{"a":"\\u0000"}' if n % 2 else "{}", ingest_time=n, producer="p",
        tenant="acme" if n % 4 else "default",
    )  # fmt: skip


def test_column_entries_decode_to_the_insert_columns_across_a_group() -> None:
    # Payloads are any bytes (NUL, empty, the separator itself); text is any text Postgres holds.
    payloads = [b"", b"\0\0", b"x" * 70_000, b"\xff\x00a", b"{}"]
    events = [_raw_event(n, payloads[n % len(payloads)]) for n in range(23)]
    entries = [encode_entry(events[:1]), encode_entry(events[1:9]), encode_entry(events[9:])]
    # As XREADGROUP returns them: [name, value, name, value, ...].
    statement, columns, tenants = decode_group(entries)
    expected: tuple[list[Any], ...] = (
        [e.id for e in events], [e.key for e in events], [e.type for e in events],
        [e.event_time for e in events], [e.event_time_nanos for e in events],
        [e.payload for e in events], [e.content_type for e in events],
        [e.attributes for e in events], [e.ingest_time for e in events],
        [e.producer for e in events],
    )  # fmt: skip
    # Text columns joined for INSERT_BATCH_JOINED, as storage binds them.
    assert statement == INSERT_BATCH_JOINED
    assert columns == tuple(
        TEXT_SEPARATOR.join(values) if at in (0, 1, 2, 6, 7, 9) else values
        for at, values in enumerate(expected)
    )
    assert tenants == TEXT_SEPARATOR.join(e.tenant for e in events)
    # A separator inside a value: lists for INSERT_BATCH.
    odd = [dataclasses.replace(events[0], key="a\x1fb"), *events[1:]]
    statement, columns, tenants = decode_group([encode_entry(odd)])
    assert statement == INSERT_BATCH
    assert columns[1] == [e.key for e in odd]
    assert tenants == [e.tenant for e in odd]
    broken = list(entries[1])
    broken[1] = b"9"  # says 9 events, holds 8
    with pytest.raises(ValueError, match="columns of other lengths"):
        decode_group([broken])


def test_raw_path_groups_consecutive_entries_up_to_the_limit() -> None:
    entries = [(b"%d" % n, encode_entry([_raw_event(0, b"")] * size)) for n, size in
               enumerate([700, 700, 600, 1, 2000, 5, 1999])]  # fmt: skip
    groups = bench_raw._groups(entries)
    sizes = [[len(fields[3].split(b"\0")) for _, fields in group] for group in groups]
    assert sizes == [[700, 700, 600], [1], [2000], [5], [1999]]
    assert [e for group in groups for e in group] == entries


def test_bench_takes_sql_only_from_storages_public_module() -> None:
    # ARCHITECTURE.md: the bench imports no service's internals; storage's SQL comes from
    # services.storage.sql, which storage itself uses.
    cli = Path(bench_raw.__file__).parent
    imported = set()
    for path in cli.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    assert {m for m in imported if m.split(".")[0] == "services"} <= {"services.storage.sql"}
    store = (Path(bench_raw.__file__).parents[2] / "services/storage/store.py").read_text()
    assert "    INSERT_BATCH,\n    INSERT_BATCH_JOINED," in store


def test_latency_percentiles_match_known_distributions() -> None:
    uniform = latency_summary([n / 10 for n in range(1, 10_001)])  # 0.1 .. 1000.0 ms
    exact = {"p50": 500.0, "p90": 900.0, "p99": 990.0, "p99_9": 999.0, "max": 1000.0}
    for name, value in exact.items():
        assert uniform[name] == pytest.approx(value, rel=1e-3), name
    assert uniform["count"] == 10_000 and uniform["below_zero"] == 0
    # Exponential, mean 5 ms (a long tail): each percentile is within the histogram's 0.1% of
    # the samples' exact nearest-rank value, and near the distribution's -5 ln(1 - q).
    rng = random.Random(8)
    samples = [rng.expovariate(1 / 5) for _ in range(200_000)]
    ordered = sorted(samples)
    exponential = latency_summary(samples)
    for name, q in {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99_9": 0.999}.items():
        nearest_rank = ordered[math.ceil(q * len(ordered)) - 1]
        assert exponential[name] == pytest.approx(nearest_rank, rel=1.5e-3), name
        assert exponential[name] == pytest.approx(-5 * math.log(1 - q), rel=0.05), name
    assert exponential["max"] == pytest.approx(max(samples), rel=1e-3)
    with_negatives = latency_summary([-3.0, -0.5, 2.0, 4.0])
    assert with_negatives["below_zero"] == 2 and with_negatives["p50"] == 0.0
    assert with_negatives["max"] == pytest.approx(4.0, rel=1e-3)
    assert all(math.isnan(latency_summary([])[q]) for q in exact)


def test_rate_takes_a_list_and_defaults_to_both_target_rates() -> None:
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    assert parser.parse_args(["bench"]).rate == [5000.0, 20000.0]
    assert parser.parse_args(["bench", "--rate", "2000, 7500"]).rate == [2000.0, 7500.0]
    for bad in ("5000,x", "0", "5000,5000", "5000,"):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--rate", bad])


async def test_raw_path_stores_exactly_the_events_it_generated(
    database_url: str, redis_url: str, redis_prefix: str, pg_schema: str
) -> None:
    templates = [
        make_events(id_prefix="rawtr", event_type="bench.t.raw", count=250, payload_bytes=64,
                    keys=37, offset=t * 250)
        for t in range(3)
    ]  # fmt: skip
    batches = list(raw_batches(templates, 13, producer="prod-1"))
    layout = StreamLayout(f"{redis_prefix}raw", 4)
    raw = await RawPath.prepare(redis_url=redis_url, database_url=database_url, schema=pg_schema,
                                layout=layout, batches=batches)  # fmt: skip
    try:
        result = await raw.run(timeout=60)
    finally:
        await raw.aclose()
    generated = {e.id: e for batch in batches for e in batch}
    assert len(generated) == 13 * 250
    assert result.events == result.stored == result.counted == 13 * 250
    assert result.entries == sum(len({layout.partition_for(e.key) for e in b}) for b in batches)
    assert result.inserts < result.entries  # entries were grouped
    assert result.backend_cpu_seconds is not None and result.backend_cpu_seconds > 0
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database,
        server_settings={"search_path": pg_schema},
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT count(DISTINCT id) FROM events") == 13 * 250
        rows = await conn.fetch(
            "SELECT id, key, type, payload, content_type, partition, producer, event_time_nanos,"
            " (extract(epoch FROM event_time) * 1000000)::bigint AS micros FROM events"
        )
        # Per key, store order (seq) is batch order.
        ordered = await conn.fetch("SELECT id, key FROM events ORDER BY seq")
    finally:
        await conn.close()
    assert {row["id"] for row in rows} == set(generated)
    for row in rows:
        event = generated[row["id"]]
        assert (row["key"], row["type"], row["payload"], row["content_type"], row["producer"]) == (
            event.key, event.type, event.payload, event.content_type, "prod-1"
        )  # fmt: skip
        assert row["partition"] == layout.partition_for(event.key)
        assert row["micros"] - PG_EPOCH_SECONDS * 1_000_000 == event.event_time
        assert row["event_time_nanos"] == event.event_time_nanos
    position = {e.id: n for n, e in enumerate(e for b in batches for e in b)}
    by_key: dict[str, list[int]] = {}
    for row in ordered:
        by_key.setdefault(row["key"], []).append(position[row["id"]])
    assert all(order == sorted(order) for order in by_key.values())
    client = aioredis.Redis.from_url(redis_url)
    try:
        for stream in layout.streams():
            (group,) = await client.xinfo_groups(stream)
            assert group["pending"] == 0  # every entry acknowledged
    finally:
        await client.aclose()


class _FakeIngest:
    """A Publish stream served like ingest serves it: one batch after another, `work` seconds
    each, `stall` more at sequence `stall_at`; or failing with `fail` at the first batch."""

    def __init__(
        self,
        work: float,
        stall_at: int = 0,
        stall: float = 0.0,
        fail: Exception | None = None,
        recycle_after: int = 0,
        refuse_every: int = 0,
    ) -> None:
        self.work, self.stall_at, self.stall, self.fail = work, stall_at, stall, fail
        self.recycle_after = recycle_after
        """Acknowledge this many batches per stream, then end it as the gateway recycles one."""
        self.refuse_every = refuse_every
        """Refuse every n-th batch received for back-pressure (RESOURCE_EXHAUSTED, retry 10 ms)."""
        self.received = 0
        self.acked: list[int] = []

    def __call__(self, *, metadata: Any, timeout: float) -> _FakeCall:
        return _FakeCall(self)


class _FakeCall:
    def __init__(self, spec: _FakeIngest) -> None:
        self._spec = spec
        self._requests: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self._served = 0
        self._ended = False
        self._worker = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        while (data := await self._requests.get()) is not None:
            request = gateway_pb2.PublishRequest.FromString(data)
            self._spec.received += 1
            if self._spec.refuse_every and self._spec.received % self._spec.refuse_every == 0:
                pressure = ResourceExhausted("partition 0 is behind", retry_after_seconds=0.01)
                await self._replies.put(
                    gateway_pb2.PublishResponse(refusal=publish_refusal(request.sequence, pressure))
                )
                self._ended = True  # as grpcio reports a write to a call the server ended
                return
            stalled = request.sequence == self._spec.stall_at
            await asyncio.sleep(self._spec.work + (self._spec.stall if stalled else 0.0))
            if self._spec.fail is not None:
                await self._replies.put(self._spec.fail)
                return
            reply = gateway_pb2.PublishResponse(
                sequence=request.sequence, accepted=len(request.events)
            )
            await self._replies.put(reply)
            self._spec.acked.append(request.sequence)
            self._served += 1
            if self._served == self._spec.recycle_after:
                await self._replies.put(
                    gateway_pb2.PublishResponse(refusal=publish_refusal(0, recycled()))
                )
                return
        await self._replies.put(grpc.aio.EOF)

    async def write(self, data: bytes) -> None:
        if self._ended:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                details="Internal error from Core",
            )  # fmt: skip
        await self._requests.put(data)

    async def done_writing(self) -> None:
        await self._requests.put(None)

    async def read(self) -> Any:
        reply = await self._replies.get()
        if isinstance(reply, gateway_pb2.PublishResponse) and reply.HasField("refusal"):
            await asyncio.sleep(0.05)  # a reader behind the writer, as on a loaded machine
        if isinstance(reply, Exception):
            raise reply
        return reply

    def cancel(self) -> None:
        self._worker.cancel()


async def test_open_loop_charges_a_stall_to_every_batch_scheduled_behind_it() -> None:
    # 50 batches, one every 20 ms; the 10th takes 300 ms more, so the ~15 batches due meanwhile
    # wait too: measured from their intended send time, each of them shows it.
    templates = request_templates([_events(100)])
    result = await open_loop(
        _FakeIngest(work=0.002, stall_at=10, stall=0.3),
        (),
        templates,
        rate=5000,
        duration=1.0,
        drain_timeout=5,
    )
    latencies = result.latencies_ms()
    assert result.acked == 5000 and len(latencies) == 50
    assert latency_summary(latencies)["p50"] < 100
    assert max(latencies) >= 300
    assert sum(1 for latency in latencies if latency > 100) >= 8


async def test_open_and_closed_loops_follow_a_recycled_stream() -> None:
    # The gateway ends a stream after every 7 acknowledgements: the loops re-open it and resend
    # what was in flight, so each batch is acknowledged exactly once and no error is raised.
    templates = request_templates([_events(10)])
    ingest = _FakeIngest(work=0.001, recycle_after=7)
    opened = await open_loop(ingest, (), templates, rate=2000, duration=0.25, drain_timeout=5)
    assert opened.acked_batches == opened.batches == 50 and opened.recycled == 7
    assert sorted(ingest.acked) == list(range(1, 51))
    ingest = _FakeIngest(work=0.001, recycle_after=7)
    closed = await closed_loop(
        ingest, (), templates, streams=2, window=3, duration=0.3, drain_timeout=5
    )
    assert closed.recycled >= 2 and closed.acked_batches == closed.sent_batches
    assert closed.acked == 10 * closed.sent_batches


async def test_the_closed_loop_waits_out_back_pressure() -> None:
    # Back-pressure is what holds the closed loop to the stored rate: every 9th batch refused
    # with a 10 ms RetryInfo, the loop waits, re-opens and resends, and each batch is
    # acknowledged exactly once.
    templates = request_templates([_events(10)])
    closed = await closed_loop(
        _FakeIngest(work=0.001, refuse_every=9), (), templates, streams=2, window=3,
        duration=0.3, drain_timeout=5,
    )  # fmt: skip
    assert closed.refused >= 2 and closed.refused_codes == {"RESOURCE_EXHAUSTED": closed.refused}
    assert closed.acked_batches == closed.sent_batches and closed.acked == 10 * closed.sent_batches


async def test_open_loop_waits_out_back_pressure_only_when_asked_to() -> None:
    # Every 9th batch is refused for back-pressure: with back_off the loop waits the RetryInfo
    # delay, re-opens and resends from the refused batch on, so each is acknowledged once. The
    # writer sees the ended call as INTERNAL before the reader reaches the refusal: the
    # refusal, what the server said, still decides.
    templates = request_templates([_events(10)])
    ingest = _FakeIngest(work=0.001, refuse_every=9)
    opened = await open_loop(
        ingest, (), templates, rate=2000, duration=0.25, drain_timeout=5, back_off=True
    )
    assert opened.acked_batches == opened.batches == 50 and opened.refused >= 5
    assert opened.refused_wait == pytest.approx(0.01 * opened.refused)
    assert opened.refused_codes == {"RESOURCE_EXHAUSTED": opened.refused}
    assert sorted(ingest.acked) == list(range(1, 51))
    # Without it (the open loops of the bench), the refusal fails the phase, with what was seen.
    with pytest.raises(BenchError, match="RESOURCE_EXHAUSTED: partition 0 is behind") as failed:
        await open_loop(
            _FakeIngest(work=0.001, refuse_every=9), (), templates, rate=2000, duration=0.25,
            drain_timeout=5,
        )  # fmt: skip
    assert failed.value.partial is not None and failed.value.partial.acked_batches == 8


async def test_open_loop_reports_a_failed_stream_with_its_status() -> None:
    refused = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="missing or invalid access token",
    )
    with pytest.raises(BenchError, match="UNAUTHENTICATED: missing or invalid access token"):
        await open_loop(
            _FakeIngest(work=0.001, fail=refused),
            (),
            request_templates([_events(10)]),
            rate=1000,
            duration=0.2,
            drain_timeout=2,
        )


@pytest.mark.slow
async def test_tiny_bench_run_reports_every_figure_and_cleans_up(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    run = uuid.uuid4().hex[:10]
    config = bench_test_config(tmp_path, database_url, redis_url, run)
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            *("bench", "--rate", "500,1000", "--warmup", "1", "--duration", "2"),
            *("--closed-duration", "2"),
            *("--closed-batch-size", "500", "--raw-events", "3000", "--json", str(out)),
            *("--variants", "none"),  # test_bench_variants runs them
            "--no-processing",  # test_bench_processing.py runs it
        ]
    )
    assert args.handler is cmd_bench

    assert await cmd_bench(config, args) == 0
    report = json.loads(out.read_text())

    for path in FIGURES:
        value = _dig(report, path)
        assert isinstance(value, int | float) and math.isfinite(value), path
    for path in FACTS:
        assert _dig(report, path), path
    assert report["parameters"]["rate"] == [500, 1000]
    # The stack ran with the bench's explicit back-pressure, and the bound it gives is stated.
    assert report["parameters"]["backpressure"]["ingest_max_unacked_bytes"] == 32 * 1024 * 1024
    assert report["parameters"]["backpressure"]["redis_bound_bytes"] > 32 * 1024 * 1024
    for path in LATENCIES:
        figures = _dig(report, path)
        assert 0 <= figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["p99_9"], path
        assert figures["max"] > 0 and figures["p99_9"] <= figures["max"], path
    assert "method" in report["raw"] and report["raw"]["inserts"] > 0

    # Every acknowledged event stored exactly once (ids are unique per event and the table's key).
    closed, raw = report["closed_loop"], report["raw"]
    for opened, offered in zip(report["open_loops"], (500, 1000), strict=True):
        assert opened["offered_eps"] == offered
        assert opened["acked"] == opened["events"] == offered * 2
        assert opened["acked"] == opened["stored"] == opened["stored_distinct"]
        assert opened["publish_ack_ms"]["count"] == opened["acked_batches"]
    assert closed["acked"] > 0 and closed["acked"] == closed["stored"]
    assert raw["events"] == raw["stored"] == raw["counted"] == 3000

    # Torn down: no process left, the bench's schemas and stream keys gone.
    teardown = report["teardown"]
    assert teardown["schemas"] == [f"t_{run}_bench_{n}" for n in ("storage", "auth", "raw")]
    assert teardown["stream_prefix"] == f"smtest:{run}:bench:events"
    pids = [pid for pid in teardown["pids"].values() if pid]
    assert len(pids) == 5 and not [pid for pid in pids if process_alive(pid)]
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        left = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"t_{run}_%"
        )
    finally:
        await conn.close()
    assert left == []
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert [k async for k in client.scan_iter(match=f"smtest:{run}:*")] == []
    finally:
        await client.aclose()


async def test_bench_cleanup_creates_a_missing_database_first(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    # A fresh machine has no `streammesh` database yet: the bench's first step (dropping what a
    # killed run left) must not fail on it.
    name = f"t_fresh_{uuid.uuid4().hex[:10]}"
    fresh = make_url(database_url).set(database=name).render_as_string(hide_password=False)
    config = bench_test_config(tmp_path, fresh, redis_url, uuid.uuid4().hex[:10])
    try:
        await drop_bench_data(bench_stack_config(config))
    finally:
        await run_sql(database_url, f'DROP DATABASE IF EXISTS "{name}"')


def test_backend_cpu_counts_backends_opened_during_the_phase_and_refuses_lost_ones() -> None:
    # Storage's pool connects on demand: a backend found only at the end spent all its CPU in
    # the phase; one found at the start and gone at the end lost its last CPU, so no figure.
    assert backend_cpu_between({1: 2.0}, {1: 2.5, 2: 0.75}) == pytest.approx(1.25)
    assert backend_cpu_between({1: 2.0, 3: 1.0}, {1: 2.5}) is None
    assert backend_cpu_between(None, {1: 1.0}) is None
    assert backends_cpu([]) is None
    assert backends_cpu([os.getpid()]) is not None  # this process: /proc has its CPU
