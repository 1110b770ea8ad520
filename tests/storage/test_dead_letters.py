"""Dead letters in storage over real mTLS and Postgres: idempotent recording, newest-first keyset
pages with filters, reading back events or raw fields, the replay mark, and the peer policy."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh import MeshServer
from streammesh.mesh.postgres import create_engine
from tests.storage.conftest import Connect, StartServer, Stub, queued
from tests.storage.test_migrations_and_outage import closed_port


def dead_letter(
    entry_id: str,
    *,
    partition: int = 0,
    ids: tuple[str, ...] = ("e1", "e2"),
    error: str = "INTERNAL: boom",
    deliveries: int = 5,
) -> storage_pb2.StoreDeadLetterRequest:
    batch = event_pb2.QueuedBatch(
        events=[queued(f"k{n}", event_id=event_id) for n, event_id in enumerate(ids)],
        partition=partition,
    )
    request = storage_pb2.StoreDeadLetterRequest(
        stream=f"smtest:events:p{partition}",
        partition=partition,
        entry_id=entry_id,
        batch=batch.SerializeToString(),
        event_ids=list(ids),
        error=error,
        delivery_count=deliveries,
    )
    request.first_failed_at.FromSeconds(1_714_564_800)
    request.last_failed_at.FromSeconds(1_714_564_805)
    return request


async def rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM dead_letters"))).scalar_one())


async def list_all(stub: Stub, request: storage_pb2.ListDeadLettersRequest) -> list[int]:
    """Every page's ids, checking that only the last page lacks a token."""
    ids: list[int] = []
    while True:
        page = await stub.ListDeadLetters(request, timeout=5)
        ids += [d.id for d in page.dead_letters]
        if not page.next_page_token:
            return ids
        assert page.dead_letters
        request.page_token = page.next_page_token


async def test_store_is_idempotent_on_stream_and_entry(
    processor: Stub, gateway: Stub, engine: AsyncEngine
) -> None:
    first = await processor.StoreDeadLetter(dead_letter("1-0"), timeout=5)
    assert first.created and first.dead_letter.id > 0
    stored = first.dead_letter
    assert (stored.entry_id, stored.delivery_count, stored.error) == ("1-0", 5, "INTERNAL: boom")
    assert list(stored.event_ids) == ["e1", "e2"] and stored.has_batch
    assert stored.first_failed_at.seconds == 1_714_564_800
    assert not stored.HasField("replayed_at") and stored.replay_count == 0

    # A repeat (the processor crashed before acknowledging) returns the first record unchanged.
    again = await processor.StoreDeadLetter(
        dead_letter("1-0", error="INTERNAL: other", deliveries=6), timeout=5
    )
    assert not again.created
    assert again.dead_letter == stored
    assert await rows(engine) == 1
    # The same entry id on another stream is another dead letter.
    other = await processor.StoreDeadLetter(dead_letter("1-0", partition=1), timeout=5)
    assert other.created and other.dead_letter.id != stored.id
    assert await rows(engine) == 2


async def test_pages_are_newest_first_with_partition_and_replay_filters(
    processor: Stub, gateway: Stub
) -> None:
    stored = []
    for n in range(7):
        reply = await processor.StoreDeadLetter(dead_letter(f"{n + 1}-0", partition=n % 2))
        stored.append(reply.dead_letter.id)
    for replayed in (stored[1], stored[4]):
        await gateway.MarkDeadLetterReplayed(
            storage_pb2.MarkDeadLetterReplayedRequest(id=replayed, replayed_by="user:ada")
        )
    newest_first = sorted(stored, reverse=True)

    assert await list_all(gateway, storage_pb2.ListDeadLettersRequest(page_size=3)) == newest_first
    assert (
        await list_all(gateway, storage_pb2.ListDeadLettersRequest(page_size=2, partition=1))
        == [i for n, i in enumerate(stored) if n % 2 == 1][::-1]
    )
    # partition 0 set explicitly is a filter, not "unset".
    assert (
        await list_all(gateway, storage_pb2.ListDeadLettersRequest(page_size=2, partition=0))
        == [i for n, i in enumerate(stored) if n % 2 == 0][::-1]
    )
    assert await list_all(
        gateway, storage_pb2.ListDeadLettersRequest(page_size=2, replayed=False)
    ) == [i for i in newest_first if i not in (stored[1], stored[4])]
    assert await list_all(gateway, storage_pb2.ListDeadLettersRequest(replayed=True)) == [
        stored[4],
        stored[1],
    ]
    assert await list_all(
        gateway, storage_pb2.ListDeadLettersRequest(partition=0, replayed=True)
    ) == [stored[4]]

    first = await gateway.ListDeadLetters(storage_pb2.ListDeadLettersRequest(page_size=2))
    assert first.next_page_token
    for bad in (
        storage_pb2.ListDeadLettersRequest(page_token=first.next_page_token, partition=1),
        storage_pb2.ListDeadLettersRequest(page_token="not-a-token"),
        storage_pb2.ListDeadLettersRequest(page_size=-1),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.ListDeadLetters(bad, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # AIP-158: above the maximum (500) is lowered to it, not refused.
    every = await gateway.ListDeadLetters(storage_pb2.ListDeadLettersRequest(page_size=501))
    assert len(every.dead_letters) == len(stored) and not every.next_page_token


async def test_get_returns_events_or_raw_fields(processor: Stub, gateway: Stub) -> None:
    decodable = await processor.StoreDeadLetter(dead_letter("5-1", ids=("a", "b", "c")))
    found = await gateway.GetDeadLetter(
        storage_pb2.GetDeadLetterRequest(id=decodable.dead_letter.id), timeout=5
    )
    assert found.dead_letter == decodable.dead_letter
    assert [q.event.id for q in found.events] == ["a", "b", "c"]
    assert found.events[0].producer == "user-1" and found.events[0].HasField("ingest_time")
    assert not found.raw_fields

    raw = [storage_pb2.RawField(name=b"batch", value=b"\xff\x00not protobuf")]
    undecodable = await processor.StoreDeadLetter(
        storage_pb2.StoreDeadLetterRequest(
            stream="smtest:events:p0",
            entry_id="5-2",
            raw_fields=raw,
            error="DecodeError: Error parsing message\x00",
            delivery_count=1,
        ),
        timeout=5,
    )
    found = await gateway.GetDeadLetter(
        storage_pb2.GetDeadLetterRequest(id=undecodable.dead_letter.id), timeout=5
    )
    assert not found.dead_letter.has_batch and not found.events
    assert list(found.raw_fields) == raw
    # A NUL in the error text is replaced, never a reason to refuse a dead letter.
    assert found.dead_letter.error == "DecodeError: Error parsing message\ufffd"
    assert found.dead_letter.first_failed_at == found.dead_letter.last_failed_at  # both now

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.GetDeadLetter(storage_pb2.GetDeadLetterRequest(id=999_999), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_mark_replayed_counts_each_replay(processor: Stub, gateway: Stub) -> None:
    stored = (await processor.StoreDeadLetter(dead_letter("9-0"))).dead_letter
    for n, who in enumerate(("user:ada", "user:bob"), start=1):
        marked = await gateway.MarkDeadLetterReplayed(
            storage_pb2.MarkDeadLetterReplayedRequest(id=stored.id, replayed_by=who), timeout=5
        )
        assert (marked.dead_letter.replay_count, marked.dead_letter.replayed_by) == (n, who)
        assert marked.dead_letter.HasField("replayed_at")
    for bad, code in (
        (storage_pb2.MarkDeadLetterReplayedRequest(id=stored.id), "INVALID_ARGUMENT"),
        (storage_pb2.MarkDeadLetterReplayedRequest(id=424_242, replayed_by="x"), "NOT_FOUND"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.MarkDeadLetterReplayed(bad, timeout=5)
        assert caught.value.code().name == code


async def test_records_that_cannot_be_kept_are_refused(processor: Stub) -> None:
    for bad in (
        storage_pb2.StoreDeadLetterRequest(stream="s", entry_id="not-an-id"),
        storage_pb2.StoreDeadLetterRequest(entry_id="1-0"),
        storage_pb2.StoreDeadLetterRequest(stream="s", entry_id="1-0", batch=b"\xff\xff"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await processor.StoreDeadLetter(bad, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_policy_writer_and_readers_are_separate(
    server: MeshServer, connect: Connect, processor: Stub, gateway: Stub
) -> None:
    stored = (await processor.StoreDeadLetter(dead_letter("3-0"))).dead_letter
    refused = [
        gateway.StoreDeadLetter(dead_letter("3-1"), timeout=5),
        processor.ListDeadLetters(storage_pb2.ListDeadLettersRequest(), timeout=5),
        processor.GetDeadLetter(storage_pb2.GetDeadLetterRequest(id=stored.id), timeout=5),
        processor.MarkDeadLetterReplayed(
            storage_pb2.MarkDeadLetterReplayedRequest(id=stored.id, replayed_by="x"), timeout=5
        ),
        connect(server.port, "ingest").ListDeadLetters(
            storage_pb2.ListDeadLettersRequest(), timeout=5
        ),
        # Operators read and replay dead letters through the gateway (`streammesh admin
        # dead-letters`, an admin session), not with the operator certificate.
        connect(server.port, "admin").ListDeadLetters(
            storage_pb2.ListDeadLettersRequest(), timeout=5
        ),
    ]
    for call in refused:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    page = await gateway.ListDeadLetters(storage_pb2.ListDeadLettersRequest(), timeout=5)
    assert [d.id for d in page.dead_letters] == [stored.id]


async def test_database_outage_is_unavailable(start_server: StartServer, connect: Connect) -> None:
    """The processor waits on UNAVAILABLE: a dead letter is never acknowledged unrecorded."""
    engine = create_engine(
        f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/streammesh",
        schema="storage",
        application_name="storage-tests",
    )
    try:
        mesh = await start_server(engine)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await connect(mesh.port, "processor").StoreDeadLetter(dead_letter("1-0"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await connect(mesh.port, "gateway").ListDeadLetters(
                storage_pb2.ListDeadLettersRequest(), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await engine.dispose()


async def test_failure_times_at_the_edges_of_the_range_read_back(
    processor: Stub, gateway: Stub
) -> None:
    # The first and last microsecond of the Timestamp range (asyncpg stores them as -infinity
    # and infinity): listing and reading the dead letter must not fail, and gives them back.
    request = dead_letter("1-1")
    request.first_failed_at.FromNanoseconds(-62_135_596_800 * 10**9)
    request.last_failed_at.seconds, request.last_failed_at.nanos = 253_402_300_799, 999_999_000
    stored = (await processor.StoreDeadLetter(request, timeout=5)).dead_letter
    page = await gateway.ListDeadLetters(storage_pb2.ListDeadLettersRequest(), timeout=5)
    [listed] = page.dead_letters
    for got in (stored, listed):
        assert got.first_failed_at == request.first_failed_at
        assert got.last_failed_at == request.last_failed_at
    found = await gateway.GetDeadLetter(storage_pb2.GetDeadLetterRequest(id=listed.id), timeout=5)
    assert found.dead_letter.last_failed_at == request.last_failed_at
