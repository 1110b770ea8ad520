"""`streammesh bench`: the id-stamped batch templates (fast), and one tiny run of the whole bench on
its own stack with this test's database, schema prefix and stream prefix (slow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.cli.bench import add_bench_command, bench_stack_config, cmd_bench, drop_bench_data
from streammesh.cli.bench_load import (
    BenchError,
    _sequence_field,
    batch_number,
    closed_loop,
    make_events,
    open_loop,
    percentiles,
    request_templates,
)
from streammesh.cli.bench_raw import partition_templates
from streammesh.cli.stack import StackConfig, process_alive
from streammesh.refusals import publish_refusal, recycled
from streammesh.streams import StreamLayout
from tests.conftest import run_sql

LATENCIES = ["open_loop.publish_ack_ms", "open_loop.ack_to_stored_ms"]
FIGURES = [
    "open_loop.acked_eps",
    "open_loop.stored_eps",
    "closed_loop.acked_eps",
    "closed_loop.stored_eps",
    "closed_loop.caught_up_after_last_ack_s",
    "raw.stored_eps",
    "mesh_over_raw",
    "loadgen.stamp_us_per_event",
    "machine.cores",
    *(f"{lat}.{q}" for lat in LATENCIES for q in ("p50", "p99", "p99_9", "max")),
    *(
        f"{phase}.cpu_us_per_event.{process}"
        for phase in ("open_loop", "closed_loop", "raw")
        for process in (
            "gateway",
            "ingest",
            "processor",
            "storage",
            "loadgen",
            "redis",
            "postgres",
            "total",
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
        value = value[part]
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


def test_raw_templates_split_a_batch_by_partition_in_publish_order() -> None:
    layout = StreamLayout("x", 4)
    (parts,) = partition_templates([_events(200)], layout, producer="p")
    batches = [event_pb2.QueuedBatch.FromString(t.stamp(7)) for _, t in parts]
    assert sum(len(b.events) for b in batches) == 200
    for partition, batch in zip((p for p, _ in parts), batches, strict=True):
        assert batch.partition == partition
        assert {layout.partition_for(q.event.key) for q in batch.events} == {partition}
        indexes = [int(q.event.id.rsplit("-", 1)[1]) for q in batch.events]
        assert indexes == sorted(indexes)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentiles(values, 50, 99, 99.9, 100) == [500.0, 990.0, 999.0, 1000.0]
    assert all(math.isnan(v) for v in percentiles([], 50))


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
    ) -> None:
        self.work, self.stall_at, self.stall, self.fail = work, stall_at, stall, fail
        self.recycle_after = recycle_after
        """Acknowledge this many batches per stream, then end it as the gateway recycles one."""
        self.acked: list[int] = []

    def __call__(self, *, metadata: Any, timeout: float) -> _FakeCall:
        return _FakeCall(self)


class _FakeCall:
    def __init__(self, spec: _FakeIngest) -> None:
        self._spec = spec
        self._requests: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self._served = 0
        self._worker = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        while (data := await self._requests.get()) is not None:
            request = gateway_pb2.PublishRequest.FromString(data)
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
        await self._requests.put(data)

    async def done_writing(self) -> None:
        await self._requests.put(None)

    async def read(self) -> Any:
        reply = await self._replies.get()
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
    assert percentiles(latencies, 50)[0] < 100
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


def _stack_config(tmp_path: Path, database_url: str, redis_url: str, run: str) -> StackConfig:
    """A stack of this test's own: its state folder, schema prefix and stream prefix."""
    return StackConfig(
        state_dir=tmp_path / "state",
        database_url=database_url,
        db_schema_prefix=f"t_{run}_",
        redis_url=redis_url,
        stream_prefix=f"smtest:{run}:events",
        partitions=4,
        log_level="WARNING",
    )


@pytest.mark.slow
async def test_tiny_bench_run_reports_every_figure_and_cleans_up(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    run = uuid.uuid4().hex[:10]
    config = _stack_config(tmp_path, database_url, redis_url, run)
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            *("bench", "--rate", "500", "--warmup", "1", "--duration", "2"),
            *("--closed-duration", "2"),
            *("--closed-batch-size", "500", "--raw-events", "3000", "--json", str(out)),
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
    assert report["parameters"]["rate"] == 500
    for path in LATENCIES:
        figures = _dig(report, path)
        assert 0 < figures["p50"] <= figures["p99"] <= figures["p99_9"] <= figures["max"], path

    # Every acknowledged event stored exactly once (ids are unique per event and the table's key).
    opened, closed, raw = report["open_loop"], report["closed_loop"], report["raw"]
    assert opened["acked"] == opened["events"] == 1000
    assert opened["acked"] == opened["stored"] == opened["stored_distinct"]
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
    config = _stack_config(tmp_path, fresh, redis_url, uuid.uuid4().hex[:10])
    try:
        await drop_bench_data(bench_stack_config(config))
    finally:
        await run_sql(database_url, f'DROP DATABASE IF EXISTS "{name}"')
