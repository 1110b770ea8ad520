"""The idempotency window over real mTLS and real Redis: an id published again by its tenant
is a duplicate (same content: acknowledged, not queued again) or a conflict (other content:
refused per event, the first kept), inside a batch and across batches; tenants do not share
ids; the digests live in the stream's hash slot and are counted in bytes per id."""

from __future__ import annotations

import uuid
from pathlib import Path

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from redis.crc import key_slot

from services.ingest.idempotency import (
    BYTES_PER_ID,
    CONFLICT,
    CONFLICT_REASON,
    DUPLICATE,
    IdempotencyWindow,
    content_digests,
    id_fields,
)
from services.ingest.queue import StreamAppender
from services.ingest.settings import IngestSettings
from services.ingest.validation import BatchLimits, validate_batch
from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.backlog import ID_FIELD_BYTES, START_FIELD
from streammesh.entries import entry_body, run_tenants
from streammesh.mesh import MeshServer
from streammesh.mesh.tenancy import TENANT_METADATA
from streammesh.streams import StreamLayout
from tests.conftest import xrange_entries
from tests.ingest.test_ingest_service import _stub


def event(event_id: str, key: str = "k", payload: bytes = b"{}") -> event_pb2.Event:
    return event_pb2.Event(id=event_id, key=key, type="t.test", payload=payload)


async def queued(client: aioredis.Redis, layout: StreamLayout) -> list[tuple[str, str, bytes]]:
    """(tenant, id, payload) of every queued event, partition by partition."""
    found = []
    for partition in range(layout.partitions):
        for _, fields in await xrange_entries(client, layout.stream(partition)):
            columns = event_pb2.QueuedColumns.FromString(entry_body(fields).data)
            (tenant,) = run_tenants(columns)
            found += [(tenant, i, p) for i, p in zip(columns.ids, columns.payloads, strict=True)]
    return found


def as_tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    return ((TENANT_METADATA, tenant),)


async def test_duplicates_are_acknowledged_and_conflicts_refused_per_event(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    assert IngestSettings(tls_dir=pki_dir).idempotency_window_seconds == 60  # on by default
    mesh, layout = ingest
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        first = await stub.PublishBatch(
            ingest_pb2.PublishBatchRequest(
                events=[event("a"), event("b", "k2"), event("c", "k3"), event("a")],
                producer="p",
            ),
            metadata=as_tenant("acme"),
            timeout=5,
        )
        # "a" twice in one batch, the same content: the second is a duplicate of the first.
        assert (first.accepted, list(first.duplicates), list(first.refused)) == (4, [3], [])
        again = await stub.PublishBatch(
            ingest_pb2.PublishBatchRequest(
                events=[
                    event("b", "k2"),
                    event("a", payload=b'{"x":1}'),
                    event("d"),
                    event("c", "k3"),
                ],
                producer="p",
            ),
            metadata=as_tenant("acme"),
            timeout=5,
        )
        assert list(again.event_ids) == ["b", "a", "d", "c"]
        assert (again.accepted, list(again.duplicates)) == (3, [0, 3])
        assert [(r.index, r.event_id, r.reason) for r in again.refused] == [
            (1, "a", CONFLICT_REASON)
        ]
        assert "published before with other content" in again.refused[0].message
        # Another tenant's ids are its own.
        other = await stub.PublishBatch(
            ingest_pb2.PublishBatchRequest(events=[event("a", payload=b"[]")], producer="q"),
            metadata=as_tenant("globex"),
            timeout=5,
        )
        assert (other.accepted, list(other.duplicates), list(other.refused)) == (1, [], [])
    stored = sorted(await queued(redis_client, layout))
    assert stored == [
        ("acme", "a", b"{}"),
        ("acme", "b", b"{}"),
        ("acme", "c", b"{}"),
        ("acme", "d", b"{}"),
        ("globex", "a", b"[]"),
    ]


async def test_the_stream_publish_reports_them_too(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    mesh, layout = ingest
    stamped = event("t")
    stamped.event_time.CopyFrom(Timestamp(seconds=1_700_000_000, nanos=5))
    later = event("t")
    later.event_time.CopyFrom(Timestamp(seconds=1_700_000_000, nanos=6))
    requests = [
        ingest_pb2.PublishRequest(sequence=1, events=[stamped], producer="p"),
        ingest_pb2.PublishRequest(sequence=2, events=[stamped], producer="p"),
        ingest_pb2.PublishRequest(sequence=3, events=[later], producer="p"),
    ]
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        acks = [ack async for ack in stub.Publish(iter(requests), timeout=5)]
    assert [(a.accepted, list(a.duplicates)) for a in acks] == [(1, []), (1, [0]), (0, [])]
    assert [r.reason for r in acks[2].refused] == [CONFLICT_REASON]  # the event time differs
    assert [i for _, i, _ in await queued(redis_client, layout)] == ["t"]


def test_digests_tell_every_field_apart() -> None:
    base = event_pb2.Event(id="x", key="k", type="t", payload=b"{}", content_type="")
    variants = [base]
    for change in (
        {"key": "k2"},
        {"type": "t2"},
        {"payload": b"{} "},
        {"content_type": "text/plain"},
        {"attributes": {"a": "1"}},
        {"attributes": {"a": "2"}},
    ):
        variant = event_pb2.Event()
        variant.CopyFrom(base)
        for name, value in change.items():
            if name == "attributes":
                variant.attributes.update(value)  # type: ignore[arg-type]
            else:
                setattr(variant, name, value)
        variants.append(variant)
    timed = event_pb2.Event()
    timed.CopyFrom(base)
    timed.event_time.CopyFrom(Timestamp(seconds=0))
    variants.append(timed)
    # The same content however it is spelled: "" is application/json; attributes in any order.
    spelled = event_pb2.Event(id="x", key="k", type="t", payload=b"{}")
    spelled.content_type = "application/json"
    two = event_pb2.Event(id="x", key="k", type="t", payload=b"{}", attributes={"b": "2", "a": "1"})
    owt = event_pb2.Event(id="x", key="k", type="t", payload=b"{}")
    owt.attributes["a"] = "1"
    owt.attributes["b"] = "2"
    events = [*variants, spelled, two, owt]
    digests = content_digests(events, validate_batch(events, BatchLimits(), producer="p"))
    assert len(set(digests[: len(variants)])) == len(variants)
    assert digests[len(variants)] == digests[0]
    assert digests[-1] == digests[-2]


async def test_digest_hashes_share_the_stream_slot_and_cost_what_the_bound_says(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=2)
    window = IdempotencyWindow(60, max_ids=20_000)
    current, previous = window.keys(layout, 1)
    assert current == f"{layout.prefix}:idem:{layout.tag(1)}:now"
    # The partition's hash tag, which its stream carries too: Redis Cluster puts all in one slot.
    assert key_slot(current.encode()) == key_slot(layout.stream(1).encode())
    assert key_slot(previous.encode()) == key_slot(layout.stream(1).encode())
    assert key_slot(current.encode()) != key_slot(layout.stream(0).encode())
    # What the memory bound counts per id (services/ingest/pressure.py), at the hash's share.
    appender = StreamAppender(redis_client, layout, window=window)
    for _ in range(10):
        batch = [event(str(uuid.uuid4()), "one-key") for _ in range(1000)]
        assert await appender.append(batch, producer="p", tenant="acme") == {}
    held = await window_hashes(redis_client, layout)
    assert sorted(held.values()) == [10_000]  # one hash, not yet rotated
    (key,) = held
    assert 60 <= await redis_client.ttl(key) <= 120
    per_id = int(await redis_client.memory_usage(key, samples=0) or 0) / 10_000
    assert BYTES_PER_ID * 0.8 <= per_id <= BYTES_PER_ID, per_id


async def window_hashes(client: aioredis.Redis, layout: StreamLayout) -> dict[str, int]:
    """Each window hash of the layout -> the ids it holds."""
    keys = [key.decode() async for key in client.scan_iter(f"{layout.prefix}:idem:*")]
    return {key: await client.hlen(key) - 1 for key in keys}  # less its START_FIELD


async def test_the_window_holds_at_most_max_ids_per_partition_whatever_the_rate(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Each hash holds at most max_ids / 2: the current one rotates early when a batch would
    take it past that, so the oldest ids are forgotten sooner (and queued again, as new)."""
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=1)
    window = IdempotencyWindow(3600, max_ids=2000)
    appender = StreamAppender(redis_client, layout, window=window)
    batches = [[event(f"b{n}-{i}") for i in range(400)] for n in range(6)]
    for number, batch in enumerate(batches):
        assert await appender.append(batch, producer="p", tenant="acme") == {}
        held = await window_hashes(redis_client, layout)
        assert max(held.values()) <= window.hash_ids, (number, held)
        assert sum(held.values()) <= window.max_ids
    now, before = window.keys(layout, 0)
    # 6 x 400 ids: [b0 b1] rotated out by b4's rotation, [b2 b3] before, [b4 b5] now.
    assert await window_hashes(redis_client, layout) == {now: 800, before: 800}
    again = await appender.append([batches[2][0], batches[5][0]], producer="p", tenant="acme")
    assert again == {0: DUPLICATE, 1: DUPLICATE}
    forgotten = await appender.append([batches[1][0]], producer="p", tenant="acme")
    assert forgotten == {}  # beyond the window: queued again (storage keeps the first)
    assert len(await queued(redis_client, layout)) == 6 * 400 + 1


async def test_a_batch_larger_than_a_hash_share_goes_whole_into_a_new_hash(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=1)
    window = IdempotencyWindow(3600, max_ids=100)
    appender = StreamAppender(redis_client, layout, window=window)
    assert await appender.append([event("small")], producer="p", tenant="acme") == {}
    big = [event(f"big-{i}") for i in range(300)]
    assert await appender.append(big, producer="p", tenant="acme") == {}
    now, before = window.keys(layout, 0)
    assert await window_hashes(redis_client, layout) == {now: 300, before: 1}
    verdicts = await appender.append([big[7], event("small")], producer="p", tenant="acme")
    assert verdicts == {0: DUPLICATE, 1: DUPLICATE}


async def test_the_current_hash_rotates_a_window_after_it_began_by_redis_clock(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=1)
    window = IdempotencyWindow(60)
    appender = StreamAppender(redis_client, layout, window=window)
    now, before = window.keys(layout, 0)

    async def age_current_hash() -> None:
        """As if the current hash began a window ago (by Redis's clock, as the script reads)."""
        clock, _ = await redis_client.time()
        began = int(await redis_client.hget(now, START_FIELD) or 0)
        assert abs(began - clock) <= 2
        await redis_client.hset(now, START_FIELD, clock - 60)

    assert await appender.append([event("first")], producer="p", tenant="acme") == {}
    await age_current_hash()
    assert await appender.append([event("second")], producer="p", tenant="acme") == {}
    assert await window_hashes(redis_client, layout) == {now: 1, before: 1}
    seen = await appender.append([event("first"), event("second")], producer="p", tenant="acme")
    assert seen == {0: DUPLICATE, 1: DUPLICATE}  # a window after: still remembered
    await age_current_hash()
    assert await appender.append([event("third")], producer="p", tenant="acme") == {}
    assert await appender.append([event("first")], producer="p", tenant="acme") == {}  # 2 windows
    assert await appender.append([event("second")], producer="p", tenant="acme") == {0: DUPLICATE}


async def test_tenants_share_the_hashes_but_not_the_ids(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=1)
    appender = StreamAppender(redis_client, layout, window=IdempotencyWindow(60))
    assert await appender.append([event("x")], producer="p", tenant="acme") == {}
    assert await appender.append([event("x", payload=b"[]")], producer="p", tenant="beta") == {}
    again = await appender.append([event("x", payload=b"[]")], producer="p", tenant="acme")
    assert again == {0: CONFLICT}
    assert id_fields("acme", ["x"]) != id_fields("beta", ["x"])
    assert id_fields("ac", ["mex"]) != id_fields("acm", ["ex"])
    assert [len(f) for f in id_fields("acme", ["", "x", "y" * 500])] == [ID_FIELD_BYTES] * 3
    assert id_fields("acme", []) == []
    assert sorted((await window_hashes(redis_client, layout)).values()) == [2]


async def test_a_dead_letter_replay_is_queued_whatever_the_window_holds(
    ingest: tuple[MeshServer, StreamLayout], pki_dir: Path, redis_client: aioredis.Redis
) -> None:
    """A dead-lettered event was accepted (so remembered) but never stored: its replay (the
    gateway's, with the first ingest time as event time) must be queued again."""
    mesh, layout = ingest
    replayed = event("r")
    replayed.event_time.CopyFrom(Timestamp(seconds=1_700_000_000))
    channel, stub = _stub(mesh.port, pki_dir)
    async with channel:
        await stub.PublishBatch(ingest_pb2.PublishBatchRequest(events=[event("r")]), timeout=5)
        plain = await stub.PublishBatch(
            ingest_pb2.PublishBatchRequest(events=[replayed]), timeout=5
        )
        assert [r.reason for r in plain.refused] == [CONFLICT_REASON]
        replay = await stub.PublishBatch(
            ingest_pb2.PublishBatchRequest(events=[replayed], replay=True), timeout=5
        )
    assert (replay.accepted, list(replay.refused), list(replay.duplicates)) == (1, [], [])
    assert [(t, i) for t, i, _ in await queued(redis_client, layout)] == [
        ("default", "r"),
        ("default", "r"),
    ]
