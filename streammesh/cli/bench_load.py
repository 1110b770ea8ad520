"""Load through the gateway for `streammesh bench`, and what it is measured with: pre-built
batches, the open-loop scheduler, the closed-loop driver, queue-drain detection, CPU sampling
(/proc for processes, INFO for Redis) and the machine facts.

Batches are serialized once, as templates split around the slot that holds the batch number in
every event id. Sending batch n is then one C-level `bytes.join` (plus a varint for the sequence),
so each event still gets a unique id (`<run><phase>-<batch:010d>-<index:04d>`) for a few
nanoseconds of client CPU, and the load generator leaves the two shared cores to the stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import platform
import resource
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import grpc
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2
from streammesh.cli.errors import describe_rpc_error
from streammesh.mesh.errors import grpc_code
from streammesh.refusals import is_recycled, raise_if_refused, refusal_error
from streammesh.streams import StreamLayout
from streammesh.wire import varint_field

__all__ = [
    "NUMBER_WIDTH",
    "BatchTemplate",
    "BenchError",
    "ClosedLoopResult",
    "CpuSample",
    "Metadata",
    "OpenLoopResult",
    "PublishCall",
    "Stamped",
    "batch_number",
    "closed_loop",
    "connect_postgres",
    "cpu_per_event",
    "cpu_seconds_between",
    "machine_facts",
    "make_events",
    "open_loop",
    "proc_cpu_seconds",
    "publish_call",
    "request_templates",
    "sample_cpu",
    "together",
    "wait_drained",
]

T = TypeVar("T")

NUMBER_WIDTH = 10
"""Digits of the batch number inside an event id."""
_MARKER = b"@" * NUMBER_WIDTH
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PUBLISH_METHOD = "/{}/Publish".format(
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
)


class BenchError(RuntimeError):
    """The benchmark could not complete a phase; the message says which and why."""

    partial: OpenLoopResult | None = None
    """What an open loop saw until its stream failed (set by `open_loop`)."""


class Stamped(Protocol):
    """What the open loop sends: `events` per batch, batch `number` serialized by `stamp`."""

    @property
    def events(self) -> int: ...

    def stamp(self, number: int) -> bytes: ...


@dataclass(frozen=True)
class BatchTemplate:
    """A serialized message with the batch-number slot of every event id cut out."""

    parts: tuple[bytes, ...]
    events: int

    @classmethod
    def split(cls, serialized: bytes, events: int) -> BatchTemplate:
        parts = tuple(serialized.split(_MARKER))
        if len(parts) != events + 1:
            raise ValueError(f"expected {events} id slots in the template, found {len(parts) - 1}")
        return cls(parts, events)

    def stamp(self, number: int) -> bytes:
        """The message with `number` written into every event id."""
        return (b"%010d" % number).join(self.parts)


def make_events(
    *, id_prefix: str, event_type: str, count: int, payload_bytes: int, keys: int, offset: int
) -> list[event_pb2.Event]:
    """`count` events with ids `<id_prefix>-@@@@@@@@@@-<index>` (the slot the stamp fills),
    keys spread over `keys` values and JSON payloads of exactly `payload_bytes` bytes."""
    events = []
    for index in range(count):
        n = offset + index
        body = f'{{"n":{n},"reading":{20 + (n % 97) / 10:.1f},"site":"site-{n % 7}","pad":"'
        pad = max(0, payload_bytes - len(body) - 2)
        events.append(
            event_pb2.Event(
                id=f"{id_prefix}-{_MARKER.decode()}-{index:04d}",
                key=f"key-{n % keys}",
                type=event_type,
                payload=(body + "x" * pad + '"}').encode(),
                content_type="application/json",
            )
        )
    return events


def batch_number(event_id: str, id_prefix: str) -> int:
    """The batch number stamped into an id made from `make_events(id_prefix=...)`."""
    start = len(id_prefix) + 1
    return int(event_id[start : start + NUMBER_WIDTH])


def request_templates(batches: Sequence[Sequence[event_pb2.Event]]) -> list[BatchTemplate]:
    """PublishRequest bodies without the sequence field (prepended per send)."""
    return [
        BatchTemplate.split(
            gateway_pb2.PublishRequest(events=events).SerializeToString(), len(events)
        )
        for events in batches
    ]


def _sequence_field(sequence: int) -> bytes:
    """PublishRequest.sequence (field 1) on the wire; fields may come in any order."""
    return varint_field(1, sequence)


PublishCall = Callable[..., Any]
"""The gateway's Publish as a stream-stream callable taking pre-serialized request bytes."""
Metadata = tuple[tuple[str, str], ...] | Callable[[], tuple[tuple[str, str], ...]]
"""Call metadata, or what gives the current one (a token refreshed during a long run), read at
every stream the loops open."""


def _resolve(metadata: Metadata) -> tuple[tuple[str, str], ...]:
    return metadata() if callable(metadata) else metadata


def publish_call(channel: grpc.aio.Channel) -> PublishCall:
    # No request serializer: the bytes go out as they are.
    call: PublishCall = channel.stream_stream(
        PUBLISH_METHOD, response_deserializer=gateway_pb2.PublishResponse.FromString
    )
    return call


async def together(*coroutines: Coroutine[Any, Any, T]) -> list[T]:
    """Run the coroutines concurrently; the first to fail cancels the others and its exception
    is raised as it is (not wrapped in an ExceptionGroup)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


@dataclass
class OpenLoopResult:
    batches: int
    events: int
    batch_size: int
    started: float
    """Loop time of batch 0's intended send."""
    started_wall: float
    intended: list[float]
    send_lag: list[float]
    ack_time: list[float]
    ack_wall: list[float]
    acked: int = 0
    recycled: int = 0
    """Streams the gateway recycled (re-opened, unacknowledged batches resent)."""
    refused: int = 0
    """Refusals waited out (`back_off`): streams re-opened after RetryInfo."""
    refused_codes: dict[str, int] = field(default_factory=dict)
    """... by status code (RESOURCE_EXHAUSTED: back-pressure)."""
    refused_wait: float = 0.0
    """Seconds spent waiting them out."""

    @property
    def acked_batches(self) -> int:
        return sum(1 for t in self.ack_time if not math.isnan(t))

    def latencies_ms(self) -> list[float]:
        """Publish-ack latency per acknowledged batch, from its INTENDED send time."""
        return [
            (ack - due) * 1000
            for ack, due in zip(self.ack_time, self.intended, strict=True)
            if not math.isnan(ack)
        ]

    @property
    def last_ack(self) -> float:
        acked = [t for t in self.ack_time if not math.isnan(t)]
        return max(acked) if acked else self.started


async def open_loop(
    publish: PublishCall,
    metadata: Metadata,
    templates: Sequence[Stamped],
    *,
    rate: float,
    duration: float,
    drain_timeout: float,
    back_off: bool = False,
) -> OpenLoopResult:
    """Send batch k at t0 + k*batch/rate on one Publish stream, never waiting for acks (they are
    read by a second task), so a slow ack cannot delay the schedule, and every latency counts
    from the intended send time: a stall is charged to each batch that should have gone out.
    A stream the gateway recycles is re-opened and its unacknowledged batches resent. With
    `back_off`, a refusal for back-pressure (RESOURCE_EXHAUSTED) or UNAVAILABLE is waited out as
    a client should (its RetryInfo delay), then the stream re-opened and the batches not
    acknowledged resent; a failed
    stream raises BenchError with what was seen until then as `partial`."""
    loop = asyncio.get_running_loop()
    batch_size = templates[0].events
    batches = max(1, round(rate * duration / batch_size))
    interval = batch_size / rate
    t0 = loop.time() + 0.1
    nan = math.nan
    result = OpenLoopResult(
        batches=batches,
        events=batches * batch_size,
        batch_size=batch_size,
        started=t0,
        started_wall=time.time() + (t0 - loop.time()),
        intended=[t0 + k * interval for k in range(batches)],
        send_lag=[nan] * batches,
        ack_time=[nan] * batches,
        ack_wall=[nan] * batches,
    )
    in_flight: deque[int] = deque()  # batches written and not acknowledged, in order
    written = [0]  # batches written at least once (a writer may be cancelled while waiting)

    def message(k: int) -> bytes:
        return _sequence_field(k + 1) + templates[k % len(templates)].stamp(k)

    async def write(call: Any) -> None:
        for k in list(in_flight):  # after a recycled stream: resend, in order
            await call.write(message(k))
        while (k := written[0]) < batches:
            delay = result.intended[k] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            result.send_lag[k] = loop.time() - result.intended[k]
            in_flight.append(k)
            written[0] += 1
            await call.write(message(k))
        await call.done_writing()

    async def read(call: Any) -> None:
        while (reply := await call.read()) is not grpc.aio.EOF:
            _raise_if_ended(reply, back_off=back_off)
            k = reply.sequence - 1
            in_flight.popleft()
            result.ack_time[k] = loop.time()
            result.ack_wall[k] = time.time()
            result.acked += reply.accepted

    deadline = t0 + duration + drain_timeout
    while True:
        call = publish(metadata=_resolve(metadata), timeout=max(1.0, deadline - loop.time() + 30))
        try:
            await _run_stream(call, [write(call), read(call)], deadline=deadline)
            return result
        except _Recycled:
            result.recycled += 1
        except _Refused as refused:  # nothing from the refused batch on was accepted
            result.refused += 1
            result.refused_codes[refused.code] = result.refused_codes.get(refused.code, 0) + 1
            result.refused_wait += refused.retry_after
            await asyncio.sleep(refused.retry_after)
        except BenchError as error:
            error.partial = result
            raise


class _Recycled(Exception):
    """The gateway recycled the stream (STREAM_RECYCLED): re-open it and resend."""


_WAITED_OUT = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
"""Refusals `back_off` waits out: back-pressure, and the gateway giving up resuming ingest; both
say when to retry (RetryInfo), and resending is safe (ids make it idempotent)."""


class _Refused(Exception):
    """A batch refused with a code of _WAITED_OUT: wait `retry_after`, re-open, resend."""

    def __init__(self, code: str, retry_after: float) -> None:
        super().__init__(code, retry_after)
        self.code = code
        self.retry_after = retry_after


def _raise_if_ended(reply: gateway_pb2.PublishResponse, *, back_off: bool = False) -> None:
    if reply.HasField("refusal"):
        if is_recycled(reply.refusal):
            raise _Recycled
        code = grpc_code(reply.refusal.code)
        if back_off and code in _WAITED_OUT:
            delay = refusal_error(reply.refusal, service="gateway").retry_after_seconds
            raise _Refused(code.name, 1.0 if delay is None else delay)
    raise_if_refused(reply)


READER_GRACE = 10.0
"""Seconds the reader may take to reach the end of what the server sent after the writer
failed: the refusal there is the stream's true status (see streammesh.refusals)."""


async def _run_stream(call: Any, coroutines: list[Any], *, deadline: float) -> None:
    """Run a stream's writer and reader (the last coroutine) until both end or `deadline` (loop
    time) passes; then cancel the call. A failed stream raises BenchError with its status.
    When the writer fails first, the reader's verdict wins: grpcio's asyncio client can report a
    stream the server ended as INTERNAL to a writer, while the replies before it say why."""
    loop = asyncio.get_running_loop()
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    failure: BaseException | None = None
    detail = ""
    try:
        done, _ = await asyncio.wait(
            tasks, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_EXCEPTION
        )
        reader = tasks[-1]
        if reader not in done and any(t.exception() is not None for t in done):
            await asyncio.wait({reader}, timeout=READER_GRACE)
            if reader.done() and reader.exception() is not None:
                done = {reader}
        failure = next((t.exception() for t in done if t.exception() is not None), None)
        if isinstance(failure, _Recycled | _Refused):
            raise failure
        if isinstance(failure, grpc.aio.AioRpcError):
            detail = describe_rpc_error(failure)
        elif failure is not None:  # a write after the call ended: ask the call why it ended
            async with asyncio.timeout(5):
                detail = f"{(await call.code()).name}: {await call.details()}"
    finally:
        call.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if failure is not None:
        raise BenchError(f"Publish stream failed: {detail}") from failure


@dataclass
class ClosedLoopResult:
    streams: int
    window: int
    batch_size: int
    duration: float
    started: float
    sent_batches: int = 0
    acked_batches: int = 0
    acked: int = 0
    last_ack: float = 0.0
    ack_latencies_ms: list[float] = field(default_factory=list)
    """Send-to-ack per batch (closed loop: queueing in the window is not included)."""
    recycled: int = 0
    """Streams the gateway recycled (re-opened, unacknowledged batches resent)."""
    refused: int = 0
    """Refusals waited out (back-pressure or UNAVAILABLE with RetryInfo): streams re-opened
    after the delay, unacknowledged batches resent. Back-pressure is what holds the closed
    loop to the stored rate, so it is expected here."""
    refused_codes: dict[str, int] = field(default_factory=dict)


async def closed_loop(
    publish: PublishCall,
    metadata: Metadata,
    templates: Sequence[BatchTemplate],
    *,
    streams: int,
    window: int,
    duration: float,
    drain_timeout: float,
    max_events: int = 50_000_000,
) -> ClosedLoopResult:
    """`streams` Publish streams, each keeping `window` batches in flight, for `duration`
    seconds: a new batch goes out as soon as an ack frees a slot. A stream the gateway recycles
    is re-opened and its unacknowledged batches resent; so is one refused for back-pressure,
    after the RetryInfo delay, as a client should."""
    loop = asyncio.get_running_loop()
    batch_size = templates[0].events
    numbers = itertools.count()
    max_batches = max(1, max_events // batch_size)
    result = ClosedLoopResult(streams, window, batch_size, duration, started=loop.time())
    stop_at = result.started + duration

    async def one_stream() -> None:
        slots = asyncio.Semaphore(window)
        sent_at: dict[int, float] = {}
        in_flight: deque[tuple[int, int]] = deque()  # (sequence, batch number), in order
        sequences = itertools.count(1)

        def message(sequence: int, n: int) -> bytes:
            return _sequence_field(sequence) + templates[n % len(templates)].stamp(n)

        async def write(call: Any) -> None:
            for sequence, n in list(in_flight):  # after a recycled stream: resend, in order
                await call.write(message(sequence, n))
            while loop.time() < stop_at and result.sent_batches < max_batches:
                await slots.acquire()
                if loop.time() >= stop_at:
                    break
                n, sequence = next(numbers), next(sequences)
                result.sent_batches += 1
                sent_at[sequence] = loop.time()
                in_flight.append((sequence, n))
                await call.write(message(sequence, n))
            await call.done_writing()

        async def read(call: Any) -> None:
            while (reply := await call.read()) is not grpc.aio.EOF:
                _raise_if_ended(reply, back_off=True)
                in_flight.popleft()
                now = loop.time()
                result.ack_latencies_ms.append((now - sent_at.pop(reply.sequence)) * 1000)
                result.acked += reply.accepted
                result.acked_batches += 1
                result.last_ack = max(result.last_ack, now)
                slots.release()

        while True:
            call = publish(metadata=_resolve(metadata), timeout=duration + drain_timeout + 30)
            try:
                await _run_stream(call, [write(call), read(call)], deadline=stop_at + drain_timeout)
                return
            except _Recycled:
                result.recycled += 1
            except _Refused as refused:  # nothing from the refused batch on was accepted
                result.refused += 1
                result.refused_codes[refused.code] = result.refused_codes.get(refused.code, 0) + 1
                await asyncio.sleep(refused.retry_after)

    await together(*(one_stream() for _ in range(streams)))
    return result


async def _queue_drained(client: aioredis.Redis, layout: StreamLayout) -> bool:
    """Every entry of every partition delivered to the group and acknowledged (the processor
    acknowledges only after storage committed, so this means: all stored)."""
    async with client.pipeline(transaction=False) as pipe:
        for stream in layout.streams():
            pipe.xinfo_stream(stream)
            pipe.xinfo_groups(stream)
        replies = await pipe.execute()
    for index in range(0, len(replies), 2):
        info, groups = replies[index], replies[index + 1]
        group = next(
            (g for g in groups if g["name"] in (layout.group, layout.group.encode())), None
        )
        if group is None:
            return False
        if group["pending"] or group["last-delivered-id"] != info["last-generated-id"]:
            return False
    return True


async def wait_drained(
    client: aioredis.Redis, layout: StreamLayout, *, timeout: float, interval: float = 0.05
) -> float | None:
    """Poll the queue until drained; the loop time it was seen drained, or None on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await _queue_drained(client, layout):
            return loop.time()
        if loop.time() > deadline:
            return None
        await asyncio.sleep(interval)


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, ..., utime, stime, cutime, cstime]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _postgres_cpu() -> float:
    """CPU seconds of every process named `postgres`, plus what the postmaster collected from
    backends that already exited (cutime + cstime), so a connection closed during a phase still
    counts. Other databases' backends on the same server are included."""
    stats = {}
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        fields = _stat_fields(comm.parent.name)
        if fields is not None:
            stats[comm.parent.name] = fields
    total = 0
    for fields in stats.values():
        total += int(fields[11]) + int(fields[12])
        if fields[1] not in stats:  # the postmaster: its parent is not a postgres process
            total += int(fields[13]) + int(fields[14])
    return total / _CLOCK_TICKS


def _machine_busy() -> float:
    """Non-idle CPU seconds of the whole machine, all cores (/proc/stat)."""
    with contextlib.suppress(OSError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        guest = sum(values[8:10])  # already inside user and nice
        return (sum(values) - guest - idle) / _CLOCK_TICKS
    return math.nan


@dataclass(frozen=True)
class CpuSample:
    services: Mapping[str, float | None]
    loadgen: float
    redis: float | None
    postgres: float
    machine: float


async def sample_cpu(pids: Mapping[str, int | None], client: aioredis.Redis) -> CpuSample:
    """CPU seconds used so far by each service, this process, Redis and PostgreSQL."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    redis_seconds: float | None
    try:
        info = await client.info("cpu")
        redis_seconds = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    except Exception:  # INFO may be renamed or refused on a managed Redis: report it unknown
        redis_seconds = None
    return CpuSample(
        services={name: (proc_cpu_seconds(pid) if pid else None) for name, pid in pids.items()},
        loadgen=usage.ru_utime + usage.ru_stime,
        redis=redis_seconds,
        postgres=_postgres_cpu(),
        machine=_machine_busy(),
    )


def cpu_seconds_between(before: CpuSample, after: CpuSample) -> dict[str, float | None]:
    """CPU seconds each sampled process (a replica's label) used between two samples."""
    out: dict[str, float | None] = {}
    for name, start in before.services.items():
        end = after.services.get(name)
        out[name] = None if start is None or end is None else end - start
    return out


def cpu_per_event(before: CpuSample, after: CpuSample, events: int) -> dict[str, float | None]:
    """CPU microseconds per event between two samples, per service (None when unknown): the
    sum of its replicas when the samples name several (`storage`, `storage@2`, ...)."""

    def per_event(seconds: float | None) -> float | None:
        return None if seconds is None or events <= 0 else seconds * 1e6 / events

    spent: dict[str, float | None] = {}
    for name, seconds in cpu_seconds_between(before, after).items():
        service = name.split("@", 1)[0]
        so_far = spent.get(service, 0.0)
        spent[service] = None if so_far is None or seconds is None else so_far + seconds
    out = {service: per_event(seconds) for service, seconds in spent.items()}
    out["loadgen"] = per_event(after.loadgen - before.loadgen)
    redis_delta = (
        None if before.redis is None or after.redis is None else after.redis - before.redis
    )
    out["redis"] = per_event(redis_delta)
    out["postgres"] = per_event(after.postgres - before.postgres)
    known = [value for value in out.values() if value is not None]
    out["total"] = sum(known) if known else None
    # Everything the machine did, and the part of it none of the above did (other tenants of a
    # shared machine, the kernel's softirq work for loopback traffic, ...).
    machine, total = per_event(after.machine - before.machine), out["total"]
    out["machine"] = machine
    out["other"] = None if machine is None or total is None else machine - total
    return out


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


async def machine_facts(database_url: str, redis: aioredis.Redis) -> dict[str, Any]:
    """Cores, versions, and the durability settings as the servers report them."""
    facts: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }
    info = await redis.info("server")
    persistence = await redis.info("persistence")
    facts["redis"] = {
        "version": info.get("redis_version"),
        # INFO works where CONFIG is disabled (managed Redis); appendfsync needs CONFIG.
        "appendonly": "yes" if int(persistence.get("aof_enabled", 0)) else "no",
        "appendfsync": "unknown",
    }
    with contextlib.suppress(aioredis.ResponseError):
        facts["redis"] |= await redis.config_get("appendfsync")
    conn = await connect_postgres(database_url)
    try:
        facts["postgres"] = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("server_version", "fsync", "synchronous_commit")
        }
    finally:
        await conn.close()
    return facts


def connect_postgres(database_url: str, **kwargs: Any) -> Any:
    """asyncpg.connect (or create_pool with `pool=True`) for a SQLAlchemy-style URL."""
    url = make_url(database_url)
    params = {
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "user": url.username or "postgres",
        "password": url.password,
        "database": url.database,
    }
    if kwargs.pop("pool", False):
        return asyncpg.create_pool(**params, **kwargs)
    return asyncpg.connect(**params, **kwargs)
