"""Dead letters end to end through the gateway, with real auth, ingest, storage and a real
stream worker storing through mTLS: a batch storage keeps failing on is set aside after
max_deliveries attempts while the traffic behind it is stored; an admin lists, inspects and
replays it (stored exactly once however often it is replayed); every call is audited; nobody but
an admin gets in."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import grpc
import pytest

from services.processor.delivery.storage_client import StorageWriter, storage_client
from services.processor.delivery.store import StoreResult
from services.processor.worker import StreamWorker, WorkerConfig
from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import admin_pb2, gateway_pb2
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.entries import QueuedBody
from streammesh.mesh import TlsMaterial, create_channel, service_config
from streammesh.mesh.tasks import stop_task
from tests.gateway.conftest import Stack
from tests.processor.conftest import drained, wait_for

if TYPE_CHECKING:
    StorageStub = storage_pb2_grpc.StorageServiceAsyncStub
else:
    StorageStub = storage_pb2_grpc.StorageServiceStub

WORKER = WorkerConfig(
    read_count=8,
    block_ms=50,
    retry_backoff_seconds=0.05,
    # One worker, no handover: a lease that could lapse while the shared event loop starves
    # would only add attempts (a legitimate redelivery) to counts this module asserts exactly.
    lease_ttl_ms=10_000,
    heartbeat_ms=50,
    trim_interval_seconds=0,
    max_deliveries=2,
)


@dataclass
class Pipeline:
    """A processor worker storing through the real StorageWriter; storage "fails" (INTERNAL)
    on any batch holding an id in `poisoned`. `attempts` counts, per poisoned id, the calls
    that carried its entry alone (each one a counted failure); `grouped` the calls that
    carried it with other entries (the worker then retries entry by entry, so they never
    count: how many there are depends on how many entries one read returned)."""

    worker: StreamWorker
    poisoned: set[str] = field(default_factory=set)
    attempts: dict[str, int] = field(default_factory=dict)
    grouped: dict[str, int] = field(default_factory=dict)


@pytest.fixture
async def pipeline(stack: Stack) -> AsyncIterator[Pipeline]:
    client = storage_client(f"127.0.0.1:{stack.storage_port}", stack.pki_dir, timeout_seconds=5)
    writer = StorageWriter(client)
    poisoned: set[str] = set()
    attempts: dict[str, int] = {}
    grouped: dict[str, int] = {}

    async def store(raw: QueuedBody) -> StoreResult:
        ids = {q.event.id for q in raw.batch().events}
        hit = poisoned & ids
        counts = attempts if ids <= poisoned else grouped
        for event_id in hit:
            counts[event_id] = counts.get(event_id, 0) + 1
        if hit:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="storage bug",
            )
        return await writer.store(raw)

    worker = StreamWorker(
        stack.redis,
        stack.layout,
        consumer="gw-test",
        store=store,
        config=WORKER,
        dead_letters=writer.record_dead_letter,
    )
    task = asyncio.create_task(worker.run())
    try:
        yield Pipeline(worker, poisoned, attempts, grouped)
    finally:
        worker.stop()
        await asyncio.wait({task}, timeout=5)  # a graceful stop releases the leases
        await stop_task(task)
        await client.close()


@pytest.fixture
async def storage_as_processor(stack: Stack) -> AsyncIterator[StorageStub]:
    channel = create_channel(
        f"127.0.0.1:{stack.storage_port}",
        TlsMaterial.load(stack.pki_dir, "processor"),
        server_name="storage",
        config=service_config("streammesh.storage.v1.StorageService", health_checked=False),
    )
    yield cast(StorageStub, storage_pb2_grpc.StorageServiceStub(channel))
    await channel.close()


async def stored_count(stack: Stack, keys: list[str]) -> int:
    reply = await stack.gateway.CountEvents(
        gateway_pb2.CountEventsRequest(filter=event_pb2.EventFilter(keys=keys)),
        metadata=stack.people["analyst"].bearer(),
        timeout=10,
    )
    return int(reply.count)


async def audited(
    stack: Stack, *, since: dt.datetime, action: str, outcome: str, expect: int = 1
) -> list[admin_pb2.AuditEvent]:
    request = admin_pb2.ListAuditEventsRequest(action=action, outcome=outcome, page_size=100)
    request.start_time.FromDatetime(since)
    deadline = time.monotonic() + 10
    while True:
        reply = await stack.admin.ListAuditEvents(
            request, metadata=stack.admin_person.bearer(), timeout=10
        )
        if len(reply.events) >= expect or time.monotonic() > deadline:
            return list(reply.events)
        await asyncio.sleep(0.05)


async def test_poison_is_set_aside_listed_inspected_and_replayed_exactly_once(
    stack: Stack, pipeline: Pipeline
) -> None:
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    admin = stack.admin_person.bearer()
    producer = stack.people["producer"]
    pipeline.poisoned.update({"dl-poison-1", "dl-poison-2"})
    key = "dl-order-1"  # one key: one partition, kept in order
    for ids in (["dl-poison-1", "dl-poison-2"], ["dl-after-1"], ["dl-after-2"]):
        await stack.gateway.PublishBatch(
            gateway_pb2.PublishBatchRequest(
                events=[
                    event_pb2.Event(id=event_id, key=key, type="order.created", payload=b"{}")
                    for event_id in ids
                ]
            ),
            metadata=producer.bearer(),
            timeout=10,
        )

    # The poison is set aside after max_deliveries attempts; what follows it is stored.
    await wait_for(lambda: pipeline.worker.stats.dead_lettered == 1)
    await wait_for(lambda: drained(stack.redis, stack.layout))
    assert await stored_count(stack, [key]) == 2
    # Counted failures, not calls: a read that also returned the entries behind the poison
    # tried them as one group first each round (tests/processor/test_worker.py).
    assert pipeline.attempts == {"dl-poison-1": 2, "dl-poison-2": 2}

    listed = await stack.admin.ListDeadLetters(
        admin_pb2.ListDeadLettersRequest(replayed=False), metadata=admin, timeout=10
    )
    [dead] = [d for d in listed.dead_letters if "dl-poison-1" in d.event_ids]
    assert list(dead.event_ids) == ["dl-poison-1", "dl-poison-2"]
    assert dead.delivery_count == 2 and dead.has_batch and dead.replay_count == 0
    assert dead.error == "INTERNAL: storage bug"
    assert dead.stream == stack.layout.stream(dead.partition)
    other_partition = admin_pb2.ListDeadLettersRequest(partition=1 - dead.partition)
    elsewhere = await stack.admin.ListDeadLetters(other_partition, metadata=admin, timeout=10)
    assert dead.id not in [d.id for d in elsewhere.dead_letters]

    shown = await stack.admin.GetDeadLetter(
        admin_pb2.GetDeadLetterRequest(id=dead.id), metadata=admin, timeout=10
    )
    assert [q.event.id for q in shown.events] == ["dl-poison-1", "dl-poison-2"]
    original_producer = shown.events[0].producer
    users = await stack.admin.ListUsers(
        admin_pb2.ListUsersRequest(username_prefix=producer.username), metadata=admin, timeout=10
    )
    assert original_producer == users.users[0].user_id

    # Storage is fixed; an admin replays twice: the events are stored once, by their producer.
    pipeline.poisoned.clear()
    for n in (1, 2):
        replayed = await stack.admin.ReplayDeadLetter(
            admin_pb2.ReplayDeadLetterRequest(id=dead.id), metadata=admin, timeout=10
        )
        assert replayed.republished == 2
        assert replayed.dead_letter.replay_count == n
        assert replayed.dead_letter.replayed_by == f"user:{stack.admin_person.username}"
        assert replayed.dead_letter.HasField("replayed_at")
        await wait_for(lambda: drained(stack.redis, stack.layout))
    assert await stored_count(stack, [key]) == 4
    stored = await stack.gateway.QueryEvents(
        gateway_pb2.QueryEventsRequest(filter=event_pb2.EventFilter(keys=[key])),
        metadata=stack.people["analyst"].bearer(),
        timeout=10,
    )
    assert sorted(e.event.id for e in stored.events) == [
        "dl-after-1",
        "dl-after-2",
        "dl-poison-1",
        "dl-poison-2",
    ]
    assert {e.producer for e in stored.events} == {original_producer}
    pending_only = await stack.admin.ListDeadLetters(
        admin_pb2.ListDeadLettersRequest(replayed=False), metadata=admin, timeout=10
    )
    assert dead.id not in [d.id for d in pending_only.dead_letters]

    events = await audited(
        stack, since=since, action="dead_letter_replay", outcome="success", expect=2
    )
    assert len(events) == 2
    assert {e.actor for e in events} == {f"user:{stack.admin_person.username}"}
    assert {e.details["dead_letter_id"] for e in events} == {str(dead.id)}
    assert {e.details["events"] for e in events} == {"2"}
    assert await audited(stack, since=since, action="dead_letter_list", outcome="success", expect=3)
    assert await audited(stack, since=since, action="dead_letter_get", outcome="success")


async def test_a_replay_ingest_refuses_is_not_marked(
    stack: Stack, storage_as_processor: StorageStub
) -> None:
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    admin = stack.admin_person.bearer()
    invalid = event_pb2.QueuedBatch(
        events=[event_pb2.QueuedEvent(event=event_pb2.Event(id="dl-no-type", key="k"))]
    )
    refused = await storage_as_processor.StoreDeadLetter(
        storage_pb2.StoreDeadLetterRequest(
            stream=stack.layout.stream(0),
            entry_id="1-1",
            batch=invalid.SerializeToString(),
            event_ids=["dl-no-type"],
            error="PermanentStoreError: INVALID_ARGUMENT: type required",
            delivery_count=1,
        ),
        timeout=10,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.admin.ReplayDeadLetter(
            admin_pb2.ReplayDeadLetterRequest(id=refused.dead_letter.id), metadata=admin, timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "type" in (caught.value.details() or "")
    again = await stack.admin.GetDeadLetter(
        admin_pb2.GetDeadLetterRequest(id=refused.dead_letter.id), metadata=admin, timeout=10
    )
    assert again.dead_letter.replay_count == 0 and not again.dead_letter.HasField("replayed_at")

    undecodable = await storage_as_processor.StoreDeadLetter(
        storage_pb2.StoreDeadLetterRequest(
            stream=stack.layout.stream(0),
            entry_id="1-2",
            raw_fields=[storage_pb2.RawField(name=b"batch", value=b"\xff")],
            error="DecodeError: bad",
        ),
        timeout=10,
    )
    for dead_letter_id, code in (
        (undecodable.dead_letter.id, grpc.StatusCode.FAILED_PRECONDITION),
        (987_654_321, grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.admin.ReplayDeadLetter(
                admin_pb2.ReplayDeadLetterRequest(id=dead_letter_id), metadata=admin, timeout=10
            )
        assert caught.value.code() == code
    failures = await audited(
        stack, since=since, action="dead_letter_replay", outcome="failure", expect=3
    )
    assert sorted(e.reason for e in failures) == [
        "failed_precondition",
        "invalid_argument",
        "not_found",
    ]


@pytest.mark.parametrize("who", ["producer", "analyst", "producer+analyst"])
async def test_only_admins_reach_dead_letters(stack: Stack, who: str) -> None:
    bearer = stack.people[who].bearer()
    calls = [
        stack.admin.ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(), metadata=bearer, timeout=10
        ),
        stack.admin.GetDeadLetter(
            admin_pb2.GetDeadLetterRequest(id=1), metadata=bearer, timeout=10
        ),
        stack.admin.ReplayDeadLetter(
            admin_pb2.ReplayDeadLetterRequest(id=1), metadata=bearer, timeout=10
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.admin.ListDeadLetters(admin_pb2.ListDeadLettersRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_builds_the_dead_letter_requests() -> None:
    from streammesh.cli.admin import COMMANDS
    from streammesh.cli.main import build_parser

    parser = build_parser()

    def built(*argv: str) -> object:
        args = parser.parse_args(["admin", *argv])
        return COMMANDS[args.admin_cmd].build(args)

    assert built("dead-letters") == admin_pb2.ListDeadLettersRequest(page_size=50)
    filtered = built("dead-letters", "--partition", "0", "--pending", "--limit", "5")
    assert isinstance(filtered, admin_pb2.ListDeadLettersRequest)
    assert filtered.HasField("partition") and filtered.partition == 0
    assert filtered.HasField("replayed") and not filtered.replayed
    assert built("dead-letter", "7") == admin_pb2.GetDeadLetterRequest(id=7)
    assert built("replay", "7") == admin_pb2.ReplayDeadLetterRequest(id=7)
    methods = {m.name for m in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods}
    assert {command.method for command in COMMANDS.values()} <= methods
