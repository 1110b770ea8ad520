"""Property: any event ingest accepts is stored and queried back as the contract promises, field
by field. Real ingest (mTLS, its validation and queue framing), real Redis, real storage and
Postgres; the processor's part (entry -> StoreEvents) is done by the test, as it does it.

The contract (proto/streammesh/common/v1/event.proto): id as sent, or the UUID ingest assigned;
key, type, payload and attributes exactly; content_type as sent, "application/json" when empty;
event_time to the nanosecond over the whole Timestamp range, the ingest time when unset;
ingest_time and store_time to the microsecond; the producer; the partition of the key; the
first event of a repeated id wins; and store order follows publish order within a key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ingest.idempotency import CONFLICT_REASON
from services.ingest.server import IngestDeps, create_server
from services.ingest.settings import IngestSettings
from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.api.storage.v1 import storage_pb2
from streammesh.entries import entry_body
from streammesh.envelope import MAX_SECONDS, MIN_SECONDS
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.streams import COLUMNS_FIELD, StreamLayout
from tests.conftest import TRUST_DOMAIN, xrange_entries
from tests.storage.conftest import Stub
from tests.storage.test_storage import query_all

PARTITIONS = 4

_chars = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])


def _text(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(_chars, min_size=min_size, max_size=min(max_size, 12)),
        st.text(_chars, min_size=max_size, max_size=max_size),  # at the limit
    )


_times = st.one_of(
    st.none(),
    st.builds(
        Timestamp,
        seconds=st.integers(MIN_SECONDS, MAX_SECONDS),
        nanos=st.integers(0, 999_999_999),
    ),
    st.sampled_from(
        [
            Timestamp(seconds=MAX_SECONDS, nanos=999_999_999),
            Timestamp(seconds=MAX_SECONDS, nanos=999_999_000),
            Timestamp(seconds=MIN_SECONDS, nanos=0),
            Timestamp(seconds=MIN_SECONDS, nanos=999),
            Timestamp(seconds=-1, nanos=999_999_999),
            Timestamp(seconds=0, nanos=0),
        ]
    ),
)


@st.composite
def _events(draw: st.DrawFn) -> event_pb2.Event:
    event = event_pb2.Event(
        id=draw(st.one_of(st.just(""), _text(1, 128))),
        key=draw(_text(1, 256)),
        type=draw(_text(1, 128)),
        payload=draw(st.one_of(st.binary(max_size=64), st.just(b"\xff" * (1 << 20)))),
        content_type=draw(st.one_of(st.just(""), _text(1, 128))),
        attributes=draw(st.dictionaries(_text(0, 32), _text(0, 64), max_size=4)),
    )
    when = draw(_times)
    if when is not None:
        event.event_time.CopyFrom(when)
    return event


# Keys and ids drawn from small pools too, so batches repeat keys (order) and ids (idempotency).
_batches = st.lists(
    st.one_of(
        _events(),
        st.builds(
            lambda e, i, k: _with(e, i, k),
            _events(),
            st.sampled_from(["", "dup-a", "dup-b"]),
            st.sampled_from(["k1", "k2"]),
        ),
    ),
    min_size=1,
    max_size=6,
)


def _with(event: event_pb2.Event, event_id: str, key: str) -> event_pb2.Event:
    event.id, event.key = event_id, key
    return event


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def ingest(
    pki_dir: Path, redis_client: aioredis.Redis, redis_prefix: str
) -> AsyncIterator[tuple[ingest_pb2_grpc.IngestServiceStub, StreamLayout]]:
    settings = IngestSettings(
        port=0, tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, partitions=PARTITIONS
    )
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=PARTITIONS)
    await layout.ensure_group(redis_client)
    mesh: MeshServer = create_server(settings, IngestDeps(redis_client, layout))
    await mesh.start()
    channel = create_channel(
        f"127.0.0.1:{mesh.port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="ingest",
        config=service_config("streammesh.ingest.v1.IngestService", health_checked=False),
    )
    yield ingest_pb2_grpc.IngestServiceStub(channel), layout
    await channel.close()
    await mesh.stop(0)


def _micro(value: Timestamp) -> Timestamp:
    return Timestamp(seconds=value.seconds, nanos=value.nanos // 1000 * 1000)


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # 1 MiB payloads, on failure
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=_batches)
async def test_what_ingest_accepts_comes_back_as_the_contract_promises(
    batch: list[event_pb2.Event],
    ingest: tuple[ingest_pb2_grpc.IngestServiceStub, StreamLayout],
    processor: Stub,
    gateway: Stub,
    engine: AsyncEngine,
    redis_client: aioredis.Redis,
) -> None:
    stub, layout = ingest
    async with engine.begin() as conn:  # examples share the schema: start each one empty (the
        # ids event_ids holds, migration 0012, with the events)
        await conn.execute(text("TRUNCATE events, event_ids"))
    # ... and the ids ingest remembers (its idempotency window)
    remembered = [key async for key in redis_client.scan_iter(f"{layout.prefix}:idem:*")]
    if remembered:
        await redis_client.delete(*remembered)
    sent = [event_pb2.Event.FromString(e.SerializeToString()) for e in batch]
    reply = await stub.PublishBatch(
        ingest_pb2.PublishBatchRequest(events=batch, producer="producer-7"), timeout=10
    )
    # A repeated id is accepted once, the first time in the batch; a repeat with the same
    # content is a duplicate (accepted), with other content a conflict (refused).
    assert reply.accepted + len(reply.refused) == len(sent)
    assert {r.reason for r in reply.refused} <= {CONFLICT_REASON}
    # The processor's part: every queue entry to StoreEvents, partition by partition.
    ingest_time = None
    for partition in range(PARTITIONS):
        stream = layout.stream(partition)
        for _, fields in await xrange_entries(redis_client, stream):
            queued = event_pb2.QueuedColumns.FromString(fields[COLUMNS_FIELD])
            ingest_time = entry_body(fields).batch().events[0].ingest_time
            await processor.StoreEvents(storage_pb2.StoreEventsRequest(columns=queued), timeout=10)
        await redis_client.xtrim(stream, maxlen=0)
    assert ingest_time is not None

    stored = await query_all(gateway, page_size=3)
    candidates: dict[str, list[event_pb2.Event]] = {}
    for event, event_id in zip(sent, reply.event_ids, strict=True):
        assert event.id in ("", event_id)
        candidates.setdefault(event_id, []).append(event)
    assert sorted(s.event.id for s in stored) == sorted(candidates)
    now = dt.datetime.now(dt.UTC)
    last_seq: dict[str, int] = {}
    for got in stored:
        # A repeated id is stored once: the first of its events in the batch (ingest queues
        # no other).
        want = candidates[got.event.id][0]
        assert got.event.key == want.key
        assert got.event.type == want.type
        assert got.event.payload == want.payload
        assert got.event.content_type == (want.content_type or "application/json")
        assert dict(got.event.attributes) == dict(want.attributes)
        if want.HasField("event_time"):
            assert got.event.event_time == want.event_time
        else:
            assert got.event.event_time == _micro(ingest_time)
        assert got.ingest_time == _micro(ingest_time)
        assert abs(got.store_time.ToDatetime(dt.UTC) - now) < dt.timedelta(minutes=1)
        assert got.producer == "producer-7"
        assert got.partition == layout.partition_for(want.key)
        assert got.sequence > last_seq.get(want.key, 0)
        last_seq[want.key] = got.sequence
    # Publish order within a key survives the queue (ids first published under the key).
    for key in {s.event.key for s in stored}:
        published = [i for i, e in zip(reply.event_ids, sent, strict=True) if e.key == key]
        got_order = [s.event.id for s in stored if s.event.key == key]
        assert got_order == [i for i in dict.fromkeys(published) if i in got_order]
