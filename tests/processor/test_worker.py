"""The consumer loop against real Redis, with the store step recorded: acknowledgement only after
a successful store, order kept through failures, stale entries of owned partitions reclaimed,
poison dead-lettered, acknowledged entries trimmed."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
import redis.asyncio as aioredis

from services.processor.delivery.store import PermanentStoreError, StoreResult
from services.processor.worker import StreamWorker
from streammesh.api.common.v1 import event_pb2
from streammesh.entries import QueuedBody
from streammesh.streams import BATCH_FIELD, COLUMNS_FIELD
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


async def test_entries_are_acknowledged_after_store(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 2)
    await append(redis_client, layout, 0, ["a1", "a2"])
    await append(redis_client, layout, 1, ["b1"])
    store = RecordingStore()
    worker = running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=store, config=FAST)
    )

    async def all_done() -> bool:
        return len(store.stored) == 3 and await pending(redis_client, layout) == 0

    await wait_for(all_done)
    await running.stop("c1")
    assert sorted(store.stored) == ["a1", "a2", "b1"]
    assert worker.stats.batches_stored == 2


async def test_failed_store_keeps_entries_pending_and_in_order(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 2)
    for n in range(5):
        await append(redis_client, layout, 0, [f"e{n}"])
    store = RecordingStore(failures_left=3)
    worker = running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=store, config=FAST)
    )

    async def all_done() -> bool:
        return len(store.stored) == 5 and await pending(redis_client, layout) == 0

    await wait_for(all_done)
    await running.stop("c1")
    assert store.stored == ["e0", "e1", "e2", "e3", "e4"]
    assert worker.stats.store_failures == 3


async def test_stale_entries_are_reclaimed_only_in_owned_partitions(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    """An entry delivered to another consumer after our take-over, with nothing newer behind it,
    is found by XAUTOCLAIM; the same in a partition someone else owns is left alone."""
    layout = await make_layout(redis_client, redis_prefix, 2)
    # Partition 1 is owned by a live processor "other" for the whole test.
    await redis_client.set(layout.lease_key(1), "other", px=60_000)
    await append(redis_client, layout, 1, ["theirs"])
    await redis_client.xreadgroup(layout.group, "dead", {layout.stream(1): ">"}, count=10)
    store = RecordingStore()
    store.gates["held"] = asyncio.Event()
    config = dataclasses.replace(FAST, claim_idle_ms=100)
    running.start(StreamWorker(redis_client, layout, consumer="c2", store=store, config=config))
    await append(redis_client, layout, 0, ["held"])
    await wait_for(lambda: "held" in store.entered)
    # While c2 is busy, a dead consumer takes the next entry of c2's partition.
    await append(redis_client, layout, 0, ["orphan"])
    await redis_client.xreadgroup(layout.group, "dead", {layout.stream(0): ">"}, count=10)
    store.gates["held"].set()

    async def reclaimed() -> bool:
        info = await redis_client.xpending(layout.stream(0), layout.group)
        return store.stored == ["held", "orphan"] and int(info["pending"]) == 0

    await wait_for(reclaimed)
    theirs = await redis_client.xpending_range(layout.stream(1), layout.group, "-", "+", 10)
    assert [row["consumer"] for row in theirs] == [b"dead"]
    await running.stop("c2")


async def test_undecodable_and_refused_batches_go_to_dead_letters(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 2)
    await redis_client.xadd(layout.stream(0), {BATCH_FIELD: b"\xff\xff not protobuf"})
    await append(redis_client, layout, 1, ["refused"])
    await append(redis_client, layout, 1, ["fine"])

    class RefusingStore(RecordingStore):
        async def __call__(self, raw: QueuedBody) -> StoreResult:
            batch = raw.batch()
            if batch.events[0].event.id == "refused":
                raise PermanentStoreError("INVALID_ARGUMENT: bad")
            return await super().__call__(raw)

    store = RefusingStore()
    worker = running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=store, config=FAST)
    )

    async def settled() -> bool:
        return store.stored == ["fine"] and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    dead = await xrange_entries(redis_client, worker.dead_letter_stream)
    assert len(dead) == 2
    errors = sorted(fields[b"error"].decode() for _, fields in dead)
    assert errors[0].startswith("DecodeError") and errors[1].startswith("PermanentStoreError")


async def test_owner_trims_acknowledged_entries(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    for n in range(5):
        await append(redis_client, layout, 0, [f"e{n}"])
    store = RecordingStore()
    config = dataclasses.replace(FAST, trim_interval_seconds=0.05)
    worker = running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=store, config=config)
    )

    async def trimmed() -> bool:
        return len(store.stored) == 5 and await redis_client.xlen(layout.stream(0)) == 0

    await wait_for(trimmed)
    await running.stop("c1")
    assert worker.stats.entries_trimmed == 5


async def test_status_reports_every_partition(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 3)
    await append(redis_client, layout, 2, ["x"])
    await redis_client.xreadgroup(layout.group, "other", {layout.stream(2): ">"}, count=10)
    worker = StreamWorker(redis_client, layout, consumer="c1", store=RecordingStore(), config=FAST)
    statuses = await worker.partition_status()
    assert [(s.partition, s.length, s.pending) for s in statuses] == [
        (0, 0, 0),
        (1, 0, 0),
        (2, 1, 1),
    ]


def test_failpoint_specs() -> None:
    from services.processor.failpoints import Failpoint

    Failpoint("")  # off
    Failpoint("crash-after-store:3")
    Failpoint("crash-before-store")
    for bad in ("crash-during-store", "crash-after-store:0", "crash-after-store:x"):
        with pytest.raises(ValueError, match="failpoint"):
            Failpoint(bad)
    # Armed for the 2nd arrival: the first arrival and other steps are harmless.
    armed = Failpoint("crash-after-store:2")
    armed.reached("before-store")
    armed.reached("after-store")


def test_every_worker_setting_reaches_the_worker() -> None:
    from services.processor.server import worker_config
    from services.processor.settings import ProcessorSettings

    settings = ProcessorSettings(read_count=7, max_deliveries=9, failpoint="crash-after-store:2")
    config = worker_config(settings)
    assert (config.read_count, config.max_deliveries, config.failpoint) == (
        7,
        9,
        "crash-after-store:2",
    )


async def test_consecutive_entries_go_to_storage_in_one_call_within_the_limits(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    for n in range(5):
        await append(redis_client, layout, 0, [f"a{n}", f"b{n}"])  # 2 events per entry
    store = RecordingStore()
    config = dataclasses.replace(FAST, store_max_events=6)
    running.start(StreamWorker(redis_client, layout, consumer="c1", store=store, config=config))

    async def settled() -> bool:
        return len(store.stored) == 10 and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    # Entries of 2 events, at most 6 events per call: 3 entries, then the 2 left.
    assert [len(call.events) for call in store.calls] == [6, 4]
    assert store.stored == [f"{p}{n}" for n in range(5) for p in "ab"]


async def test_entries_of_both_forms_are_stored_in_order_grouped_by_form(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    # Entries an earlier release wrote (QueuedBatch) stay readable next to ingest's columns; a
    # group never mixes the two (one StoreEvents request holds one form).
    layout = await make_layout(redis_client, redis_prefix, 1)
    forms = [BATCH_FIELD, BATCH_FIELD, COLUMNS_FIELD, COLUMNS_FIELD, BATCH_FIELD, COLUMNS_FIELD]
    for n, form in enumerate(forms):
        await append(redis_client, layout, 0, [f"a{n}", f"b{n}"], form=form)
    seen: list[bool] = []

    class FormRecordingStore(RecordingStore):
        async def __call__(self, raw: QueuedBody) -> StoreResult:
            seen.append(raw.columnar)
            return await super().__call__(raw)

    store = FormRecordingStore()
    config = dataclasses.replace(FAST, store_max_events=100)
    running.start(StreamWorker(redis_client, layout, consumer="c1", store=store, config=config))

    async def settled() -> bool:
        return len(store.stored) == 12 and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    assert store.stored == [f"{p}{n}" for n in range(6) for p in "ab"]
    assert [len(call.events) for call in store.calls] == [4, 4, 2, 2]
    assert seen == [False, True, False, True]


async def test_a_failing_group_is_stored_entry_by_entry_and_only_the_bad_entry_counts(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    layout = await make_layout(redis_client, redis_prefix, 1)
    for event_id in ["g1", "bad", "g2"]:
        await append(redis_client, layout, 0, [event_id])

    class Refusing(RecordingStore):
        async def __call__(self, raw: QueuedBody) -> StoreResult:
            ids = [q.event.id for q in raw.batch().events]
            if "bad" in ids:
                raise PermanentStoreError("INVALID_ARGUMENT: bad")
            return await super().__call__(raw)

    store = Refusing()
    config = dataclasses.replace(ONE_OWNER, store_max_events=100)
    worker = running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=store, config=config)
    )

    async def settled() -> bool:
        return store.stored == ["g1", "g2"] and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    dead = await xrange_entries(redis_client, worker.dead_letter_stream)
    assert len(dead) == 1
    batch = event_pb2.QueuedBatch.FromString(dead[0][1][BATCH_FIELD])
    assert [q.event.id for q in batch.events] == ["bad"]
    assert worker.stats.dead_lettered == 1 and worker.stats.counted_failures == 1


async def test_a_retried_poison_read_with_the_entries_behind_it_counts_only_its_own_stores(
    redis_client: aioredis.Redis, redis_prefix: str, running: Running
) -> None:
    """The poison and the entries behind it are read together (as under load, when several
    entries land between two reads): each round first tries them as one group, whose failure
    is not the poison's to count, then the poison alone, which counts. So storage sees the
    poison twice per round, and the dead letter says max_deliveries: the contract counts
    failures of the entry, not calls to storage."""
    layout = await make_layout(redis_client, redis_prefix, 1)
    for event_id in ["poison", "after-1", "after-2"]:
        await append(redis_client, layout, 0, [event_id])
    grouped = alone = 0

    class Failing(RecordingStore):
        async def __call__(self, raw: QueuedBody) -> StoreResult:
            nonlocal grouped, alone
            ids = [q.event.id for q in raw.batch().events]
            if "poison" in ids:
                if ids == ["poison"]:
                    alone += 1
                else:
                    grouped += 1
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.INTERNAL,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="storage bug",
                )
            return await super().__call__(raw)

    store = Failing()
    config = dataclasses.replace(ONE_OWNER, store_max_events=100, max_deliveries=2)
    worker = running.start(
        StreamWorker(redis_client, layout, consumer="c1", store=store, config=config)
    )

    async def settled() -> bool:
        return store.stored == ["after-1", "after-2"] and await pending(redis_client, layout) == 0

    await wait_for(settled)
    await running.stop("c1")
    [(_, notice)] = await xrange_entries(redis_client, worker.dead_letter_stream)
    assert notice[b"deliveries"] == b"2"
    assert (worker.stats.counted_failures, worker.stats.dead_lettered) == (2, 1)
    assert (alone, grouped) == (2, 2)  # 4 calls at storage, 2 counted failures
    # The rest of the failed group goes on entry by entry, in order, in the same round.
    assert [len(call.events) for call in store.calls] == [1, 1]
