"""Dead letters in the consumer loop against real Redis: a poison entry is set aside after
`max_deliveries` counted failures (recorded first, then acknowledged) and the entries behind it
flow in order; outages never count; an entry is never acknowledged without its record."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import grpc
import pytest
import redis.asyncio as aioredis

from services.processor.delivery.dead_letters import (
    DeadLetterRecord,
    StoreUnavailable,
    attempts_key,
    is_outage,
)
from services.processor.delivery.storage_client import classify, store_events_request
from services.processor.delivery.store import PermanentStoreError, StoreResult
from services.processor.worker import StreamWorker
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.entries import QueuedBody
from streammesh.streams import BATCH_FIELD, COLUMNS_FIELD, StreamLayout
from tests.conftest import xrange_entries
from tests.processor.conftest import (
    FAST,
    ONE_OWNER,
    RecordingStore,
    Running,
    append,
    make_layout,
    pending,
    wait_for,
)


def rpc_error(code: grpc.StatusCode, details: str = "boom") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class PoisonStore(RecordingStore):
    """Fails every attempt at a batch whose first event id is in `poison` with `error`; stores
    the rest. Counts the attempts per poison id."""

    def __init__(self, poison: set[str], error: Exception) -> None:
        super().__init__()
        self.poison = poison
        self.error = error
        self.attempts: dict[str, int] = {}

    async def __call__(self, raw: QueuedBody) -> StoreResult:
        batch = raw.batch()
        first = batch.events[0].event.id
        if first in self.poison:
            self.attempts[first] = self.attempts.get(first, 0) + 1
            raise self.error
        return await super().__call__(raw)


class Recorder:
    """Stands in for StoreDeadLetter: keeps records, idempotent on (stream, entry id)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], DeadLetterRecord] = {}
        self.calls = 0
        self.failing: Exception | None = None
        self._ids = itertools.count(1)

    async def __call__(self, record: DeadLetterRecord) -> int:
        self.calls += 1
        if self.failing is not None:
            raise self.failing
        self.records.setdefault((record.stream, record.entry_id), record)
        return next(self._ids)


async def attempts_left(client: aioredis.Redis, layout: StreamLayout) -> int:
    return sum([await client.hlen(attempts_key(layout, p)) for p in range(layout.partitions)])


@pytest.mark.parametrize(
    "error",
    [
        rpc_error(grpc.StatusCode.INTERNAL),
        rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max"),
        RuntimeError("a bug in the store step"),
    ],
    ids=["internal", "resource-exhausted", "exception"],
)
async def test_poison_is_set_aside_after_max_deliveries_and_the_rest_flows(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running, error: Exception
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 2)
    await append(redis_client, layout, 0, ["a0"])
    poison_entry = await append(redis_client, layout, 0, ["p1", "p2"])
    for n in range(1, 4):
        await append(redis_client, layout, 0, [f"a{n}"])
    await append(redis_client, layout, 1, ["b0"])
    store = PoisonStore({"p1"}, error)
    recorder = Recorder()
    config = dataclasses.replace(ONE_OWNER, max_deliveries=3)
    worker = running.start(
        StreamWorker(
            redis_client,
            layout,
            consumer="c1",
            store=store,
            config=config,
            dead_letters=recorder,
        )
    )

    async def settled() -> bool:
        return len(store.stored) == 5 and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    assert store.attempts == {"p1": 3}
    assert [e for e in store.stored if e.startswith("a")] == ["a0", "a1", "a2", "a3"]
    assert "b0" in store.stored
    [record] = recorder.records.values()
    assert record.entry_id == poison_entry.decode() and record.partition == 0
    assert record.stream == layout.stream(0)
    assert record.event_ids == ("p1", "p2") and record.delivery_count == 3
    assert event_pb2.QueuedBatch.FromString(record.batch or b"").events[1].event.id == "p2"
    assert record.first_failed_at <= record.last_failed_at
    assert record.error.split(":")[0] in ("INTERNAL", "RESOURCE_EXHAUSTED", "RuntimeError")
    assert (worker.stats.dead_lettered, worker.stats.counted_failures) == (1, 3)
    [(_, notification)] = await xrange_entries(redis_client, worker.dead_letter_stream)
    assert notification[b"entry_id"] == poison_entry
    assert (notification[b"deliveries"], notification[b"dead_letter_id"]) == (b"3", b"1")
    assert notification[BATCH_FIELD] == record.batch
    assert await attempts_left(redis_client, layout) == 0  # forgotten with the XACK


async def test_outages_never_count_and_nothing_is_lost(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    """Storage down for ten times max_deliveries attempts: no dead letter, every entry stored
    once it is back, in order."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    for n in range(4):
        await append(redis_client, layout, 0, [f"e{n}"])
    outages = itertools.cycle(
        [
            StoreUnavailable("UNAVAILABLE: storage is unavailable"),
            rpc_error(grpc.StatusCode.UNAVAILABLE),
            rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED),
            ConnectionError("refused"),
        ]
    )
    down = 20

    class DownStore(RecordingStore):
        async def __call__(self, raw: QueuedBody) -> StoreResult:
            nonlocal down
            if down > 0:
                down -= 1
                raise next(outages)
            return await super().__call__(raw)

    store, recorder = DownStore(), Recorder()
    config = dataclasses.replace(FAST, max_deliveries=2, retry_backoff_seconds=0.01)
    worker = running.start(
        StreamWorker(
            redis_client, layout, consumer="c1", store=store, config=config, dead_letters=recorder
        )
    )

    async def all_stored() -> bool:
        return len(store.stored) == 4 and await pending(redis_client, layout) == 0

    await wait_for(all_stored)
    await running.stop("c1")
    assert store.stored == ["e0", "e1", "e2", "e3"]
    assert worker.stats.store_failures == 20 and worker.stats.counted_failures == 0
    assert recorder.calls == 0 and worker.stats.dead_lettered == 0
    assert await redis_client.xlen(worker.dead_letter_stream) == 0
    assert await attempts_left(redis_client, layout) == 0


async def test_no_acknowledgement_without_a_record(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    """While storage cannot take the dead letter, the poison entry stays pending and nothing
    behind it overtakes it; once storage answers, it is recorded once and the rest flows."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    await append(redis_client, layout, 0, ["poison"])
    await append(redis_client, layout, 0, ["after"])
    store = PoisonStore({"poison"}, rpc_error(grpc.StatusCode.INTERNAL))
    recorder = Recorder()
    recorder.failing = StoreUnavailable("UNAVAILABLE: storage is unavailable")
    config = dataclasses.replace(FAST, max_deliveries=2)
    worker = running.start(
        StreamWorker(
            redis_client, layout, consumer="c1", store=store, config=config, dead_letters=recorder
        )
    )
    await wait_for(lambda: recorder.calls >= 3)
    assert store.stored == [] and await pending(redis_client, layout) >= 1
    assert worker.stats.dead_lettered == 0
    assert await redis_client.xlen(worker.dead_letter_stream) == 0
    recorder.failing = None

    async def settled() -> bool:
        return store.stored == ["after"] and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    [record] = recorder.records.values()
    # Each retry while the record could not be written was one more real failed attempt.
    assert record.delivery_count == store.attempts["poison"] >= 3
    assert worker.stats.dead_lettered == 1


async def test_a_record_storage_refuses_whole_is_kept_without_its_batch(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    """A batch too large for any request cannot travel in its record either: the record is
    stored without it (the dead-letter stream entry still has it) rather than block forever."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    await append(redis_client, layout, 0, ["huge"])
    await append(redis_client, layout, 0, ["after"])
    store = PoisonStore({"huge"}, rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "too large"))

    class SizeLimited(Recorder):
        async def __call__(self, record: DeadLetterRecord) -> int:
            if record.batch is not None:
                self.calls += 1
                raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "request too large")
            return await super().__call__(record)

    recorder = SizeLimited()
    config = dataclasses.replace(FAST, max_deliveries=1)
    worker = running.start(
        StreamWorker(
            redis_client, layout, consumer="c1", store=store, config=config, dead_letters=recorder
        )
    )

    async def settled() -> bool:
        return store.stored == ["after"] and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    [record] = recorder.records.values()
    assert record.batch is None and record.event_ids == ("huge",)
    assert "the batch was not kept: RESOURCE_EXHAUSTED: request too large" in record.error
    [(_, notification)] = await xrange_entries(redis_client, worker.dead_letter_stream)
    assert event_pb2.QueuedBatch.FromString(notification[BATCH_FIELD]).events[0].event.id == "huge"


async def test_undecodable_and_refused_entries_are_set_aside_at_once(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    garbage = await redis_client.xadd(
        layout.stream(0), {BATCH_FIELD: b"\xff\xff not protobuf", b"events": b"1"}
    )
    assert isinstance(garbage, bytes)  # the client does not decode responses
    await append(redis_client, layout, 0, ["refused"])
    await append(redis_client, layout, 0, ["fine"])
    store = PoisonStore({"refused"}, PermanentStoreError("INVALID_ARGUMENT: bad"))
    recorder = Recorder()
    running.start(
        StreamWorker(
            redis_client,
            layout,
            consumer="c1",
            store=store,
            config=ONE_OWNER,
            dead_letters=recorder,
        )
    )

    async def settled() -> bool:
        return store.stored == ["fine"] and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    assert store.attempts == {"refused": 1}
    undecodable, refused = sorted(recorder.records.values(), key=lambda r: r.entry_id)
    assert undecodable.entry_id == garbage.decode() and undecodable.batch is None
    assert dict(undecodable.raw_fields)[BATCH_FIELD] == b"\xff\xff not protobuf"
    assert undecodable.error.startswith("DecodeError") and undecodable.delivery_count == 1
    assert refused.event_ids == ("refused",) and refused.delivery_count == 1
    assert refused.error.startswith("PermanentStoreError: INVALID_ARGUMENT")


async def test_the_count_survives_a_crash_and_a_new_owner(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    """Failed attempts are counted in Redis: the next owner goes on from the count the crashed
    one left, and the entry is set aside after max_deliveries attempts in all."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    await append(redis_client, layout, 0, ["poison"])
    await append(redis_client, layout, 0, ["after"])
    hang = asyncio.Event()
    attempts = 0

    class Store(RecordingStore):
        async def __call__(self, raw: QueuedBody) -> StoreResult:
            batch = raw.batch()
            nonlocal attempts
            if batch.events[0].event.id != "poison":
                return await super().__call__(raw)
            attempts += 1
            if attempts == 3:
                await hang.wait()  # c1 dies here, in the middle of its third attempt
            raise rpc_error(grpc.StatusCode.INTERNAL)

    store, recorder = Store(), Recorder()
    config = dataclasses.replace(FAST, max_deliveries=3)
    running.start(
        StreamWorker(
            redis_client, layout, consumer="c1", store=store, config=config, dead_letters=recorder
        )
    )
    await wait_for(lambda: attempts == 3)
    await running.crash("c1")
    # c2 takes over once c1's 400 ms lease has run out, and then keeps the partition.
    c2_config = dataclasses.replace(ONE_OWNER, max_deliveries=3)
    running.start(
        StreamWorker(
            redis_client,
            layout,
            consumer="c2",
            store=store,
            config=c2_config,
            dead_letters=recorder,
        )
    )

    async def settled() -> bool:
        return store.stored == ["after"] and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c2")
    assert attempts == 4  # two counted by c1, its interrupted third not, then c2's one
    [record] = recorder.records.values()
    assert record.delivery_count == 3


def test_failures_are_sorted_into_outages_permanent_and_counted() -> None:
    for code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "PERMISSION_DENIED"):
        error = rpc_error(grpc.StatusCode[code])
        assert is_outage(error) and isinstance(classify(error), StoreUnavailable), code
    for code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"):
        error = rpc_error(grpc.StatusCode[code])
        assert isinstance(classify(error), PermanentStoreError), code
    for code in ("INTERNAL", "RESOURCE_EXHAUSTED", "UNKNOWN", "DATA_LOSS"):
        error = rpc_error(grpc.StatusCode[code])
        assert not is_outage(error) and classify(error) is None, code
    assert is_outage(ConnectionRefusedError()) and is_outage(TimeoutError())
    assert not is_outage(ValueError("bug"))


async def test_max_deliveries_must_be_positive(redis_client: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="max_deliveries"):
        StreamWorker(
            redis_client,
            StreamLayout(prefix="smtest:unused"),
            consumer="c",
            store=RecordingStore(),
            config=dataclasses.replace(FAST, max_deliveries=0),
        )


@pytest.mark.parametrize("events", [0, 1, 3, 400])
def test_the_store_request_frames_the_entry_bytes_as_they_are(events: int) -> None:
    # The processor sends an entry's events to storage without decoding them: the framed bytes
    # must be exactly the StoreEventsRequest that holds the decoded message, in either of the
    # queue's forms (lengths of 1, 2 and 3 varint bytes).
    batch = event_pb2.QueuedBatch(partition=3)
    for n in range(events):
        batch.events.add(producer="p").event.CopyFrom(
            event_pb2.Event(id=f"id-{n}", key="k", type="t", payload=b"x" * 100)
        )
    raw = QueuedBody(BATCH_FIELD, batch.SerializeToString())
    expected = storage_pb2.StoreEventsRequest(batch=batch).SerializeToString()
    assert store_events_request(raw) == expected
    assert storage_pb2.StoreEventsRequest.FromString(store_events_request(raw)).batch == batch
    columns = event_pb2.QueuedColumns(
        ids=[f"id-{n}" for n in range(events)], payloads=[b"x" * 100] * events, partition=3
    )
    raw = QueuedBody(COLUMNS_FIELD, columns.SerializeToString())
    request = storage_pb2.StoreEventsRequest.FromString(store_events_request(raw))
    assert request.columns == columns
    assert not request.HasField("batch")
