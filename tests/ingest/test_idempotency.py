"""The idempotency window over real mTLS and real Redis: an id published again by its tenant
is a duplicate (same content: acknowledged, not queued again) or a conflict (other content:
refused per event, the first kept), inside a batch and across batches; tenants do not share
ids; the digests live in the stream's hash slot and are counted in bytes per id."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from redis.crc import key_slot

from services.ingest.idempotency import (
    BYTES_PER_ID,
    CONFLICT_REASON,
    IdempotencyWindow,
    content_digests,
)
from services.ingest.queue import StreamAppender
from services.ingest.settings import IngestSettings
from services.ingest.validation import BatchLimits, validate_batch
from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2
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
    current, previous, expires = IdempotencyWindow(60).keys(layout, 1, "acme", time.time())
    assert current.startswith(f"{layout.prefix}:idem:{{{layout.stream(1)}}}:acme:")
    assert int(previous.rsplit(":", 1)[1]) == int(current.rsplit(":", 1)[1]) - 1
    assert 60 <= expires - time.time() <= 120
    # The hash tag is the stream's name: Redis Cluster puts both in one slot.
    assert key_slot(current.encode()) == key_slot(layout.stream(1).encode())
    assert key_slot(current.encode()) != key_slot(layout.stream(0).encode())
    # What the memory bound counts per id (services/ingest/pressure.py).
    appender = StreamAppender(redis_client, layout, window=IdempotencyWindow(60))
    for _ in range(5):
        batch = [event(str(uuid.uuid4()), "one-key") for _ in range(1000)]
        assert await appender.append(batch, producer="p", tenant="acme") == {}
    (held,) = [key async for key in redis_client.scan_iter(f"{layout.prefix}:idem:*")]
    assert await redis_client.hlen(held) == 5000
    per_id = int(await redis_client.memory_usage(held, samples=0) or 0) / 5000
    assert BYTES_PER_ID * 0.7 <= per_id <= BYTES_PER_ID * 1.2, per_id


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
