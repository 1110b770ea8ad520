"""Ejection, concurrency limits and deadlines of the mesh client, over real mTLS sockets with
two or three in-process storage replicas (FlakyStorage of tests/test_mesh_client.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from streammesh.api.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceBinding,
    ServiceSettings,
    create_mesh_server,
)
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles
from streammesh.mesh.deadlines import deadline_scope
from streammesh.mesh.derived_config import RetryPolicy
from streammesh.mesh.ejection import EjectionPolicy
from streammesh.mesh.errors import STATUS_DETAILS_KEY, InvalidArgument, Unavailable
from streammesh.mesh.limits import CONCURRENCY_LIMIT_REASON
from tests.conftest import TRUST_DOMAIN
from tests.test_mesh_client import (
    STORE,
    FlakyStorage,
    client_for,
    flaky_storage,
    start_storage,
)

QUICK = EjectionPolicy(consecutive_outages=3, base_ejection_seconds=0.5, max_ejection_seconds=2)


@asynccontextmanager
async def replicas(pki_dir: Path, *servicers: FlakyStorage) -> AsyncIterator[list[MeshServer]]:
    meshes = [await start_storage(pki_dir, servicer) for servicer in servicers]
    try:
        yield meshes
    finally:
        for mesh in meshes:
            await mesh.stop(0)


def ports(meshes: list[MeshServer]) -> list[int]:
    return [mesh.port for mesh in meshes]


async def store(client: MeshClient, count: int) -> list[grpc.StatusCode]:
    """`count` StoreEvents calls one after another; the status of each."""
    stub = client.stub(storage_pb2_grpc.StorageServiceStub)
    codes = []
    for _ in range(count):
        try:
            await stub.StoreEvents(storage_pb2.StoreEventsRequest())
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
    return codes


async def test_an_unavailable_replica_is_ejected_and_readmitted(pki_dir: Path) -> None:
    good, other, bad = flaky_storage(0), flaky_storage(0), flaky_storage(10**9)
    async with (
        replicas(pki_dir, good, other, bad) as meshes,
        client_for(pki_dir, *ports(meshes), ejection=QUICK) as client,
    ):
        # Every call succeeds: an UNAVAILABLE attempt is retried on another replica.
        assert set(await store(client, 30)) == {grpc.StatusCode.OK}
        assert client.channel.ejector.ejected() == [2]
        assert bad.attempts["StoreEvents"] == 3  # the run that ejected it
        assert set(await store(client, 30)) == {grpc.StatusCode.OK}
        assert bad.attempts["StoreEvents"] == 3  # out of rotation
        bad.failures = 0  # it recovers
        await asyncio.sleep(QUICK.base_ejection_seconds)
        assert set(await store(client, 30)) == {grpc.StatusCode.OK}
        assert bad.attempts["StoreEvents"] >= 3 + 5  # back in, with about its share (10)
        assert client.channel.ejector.ejected() == []


async def test_a_stopped_replica_costs_no_call_and_rejoins_when_back(pki_dir: Path) -> None:
    """A replica stopped under load (its listener gone): every call still succeeds (the
    attempts that met it are retried on the other), and once a server listens on its address
    again it takes calls again."""
    first, second = flaky_storage(0), flaky_storage(0)
    async with replicas(pki_dir, first, second) as meshes:
        port = meshes[1].port
        async with client_for(pki_dir, *ports(meshes), ejection=QUICK) as client:
            assert set(await store(client, 10)) == {grpc.StatusCode.OK}
            load = asyncio.ensure_future(store(client, 200))
            await asyncio.sleep(0.05)
            await meshes[1].stop(0)
            assert set(await load) == {grpc.StatusCode.OK}
            back = flaky_storage(0)
            meshes[1] = await start_storage(pki_dir, back, port=port)
            deadline = time.monotonic() + 10
            while back.attempts["StoreEvents"] == 0 and time.monotonic() < deadline:
                assert set(await store(client, 5)) == {grpc.StatusCode.OK}
                await asyncio.sleep(0.05)
    assert second.attempts["StoreEvents"] > 0
    assert back.attempts["StoreEvents"] > 0


async def test_a_method_unsafe_to_retry_is_not_sent_to_another_replica(pki_dir: Path) -> None:
    failing, good = flaky_storage(10**9), flaky_storage(0)
    async with replicas(pki_dir, failing, good) as meshes:
        policy = EjectionPolicy(consecutive_outages=1000, window_min_calls=1000)
        async with client_for(pki_dir, *ports(meshes), ejection=policy) as client:
            stub = client.stub(storage_pb2_grpc.StorageServiceStub)
            codes = []
            for _ in range(10):
                try:
                    await stub.MarkDeadLetterReplayed(
                        storage_pb2.MarkDeadLetterReplayedRequest(id=1)
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
    # One attempt per call, never retried: every call the failing replica got failed.
    assert (
        failing.attempts["MarkDeadLetterReplayed"] + good.attempts["MarkDeadLetterReplayed"] == 10
    )
    assert codes.count(grpc.StatusCode.UNAVAILABLE) == failing.attempts["MarkDeadLetterReplayed"]
    assert failing.attempts["MarkDeadLetterReplayed"] >= 3  # round robin: its share


INGEST = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]


class Ingest(ingest_pb2_grpc.IngestServiceServicer):
    """Publish acknowledges every batch, or fails UNAVAILABLE before any while `broken`."""

    def __init__(self, broken: bool) -> None:
        self.broken = broken
        self.streams = 0

    async def Publish(
        self,
        request_iterator: AsyncIterator[ingest_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_pb2.PublishResponse]:
        self.streams += 1
        async for request in request_iterator:
            if self.broken:
                raise Unavailable("this replica is broken")
            yield ingest_pb2.PublishResponse(sequence=request.sequence, accepted=1)


async def start_ingest(pki_dir: Path, servicer: Ingest) -> MeshServer:
    mesh = create_mesh_server(
        ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, host="127.0.0.1", port=0),
        identity="ingest",
        bindings=[
            ServiceBinding(INGEST, ingest_pb2_grpc.add_IngestServiceServicer_to_server, servicer)
        ],
        guard=PeerPolicy.build(TRUST_DOMAIN, {f"{INGEST.full_name}/*": ["service/gateway"]}),
    )
    await mesh.start()
    return mesh


async def test_streams_ending_unavailable_eject_their_replica(pki_dir: Path) -> None:
    good, broken = Ingest(broken=False), Ingest(broken=True)  # type: ignore[abstract]
    meshes = [await start_ingest(pki_dir, good), await start_ingest(pki_dir, broken)]
    config = MeshClientConfig(
        server_name="ingest",
        targets=tuple(f"127.0.0.1:{mesh.port}" for mesh in meshes),
        tls=TlsFiles.of(pki_dir, "gateway"),
        services=(INGEST,),
        ejection=QUICK,
    )
    codes = []
    try:
        async with MeshClient(config) as client:
            stub = client.stub(ingest_pb2_grpc.IngestServiceStub)
            for sequence in range(20):
                call = stub.Publish(timeout=5)
                await call.write(ingest_pb2.PublishRequest(sequence=sequence))
                await call.done_writing()
                try:
                    codes.append([ack.sequence async for ack in call] == [sequence])
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    codes.append(False)
                await asyncio.sleep(0)  # the ejector reads the status in a task of its own
            ejected = client.channel.ejector.ejected()
    finally:
        for mesh in meshes:
            await mesh.stop(0)
    assert ejected == [1]
    assert codes.count(False) == 3  # the run that ejected it; every stream since succeeded
    assert good.streams == 17


async def test_application_errors_never_eject(pki_dir: Path) -> None:
    good, refusing = flaky_storage(0), flaky_storage(10**9, InvalidArgument)
    async with replicas(pki_dir, good, refusing) as meshes:
        policy = EjectionPolicy(consecutive_outages=1, window_min_calls=1)
        async with client_for(pki_dir, *ports(meshes), ejection=policy) as client:
            codes = await store(client, 40)
            assert client.channel.ejector.ejected() == []
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) == refusing.attempts["StoreEvents"]
    # Never retried, never ejected: it keeps about half of all calls (round robin among the
    # READY ones; the first calls may go to the one that connected first).
    assert good.attempts["StoreEvents"] + refusing.attempts["StoreEvents"] == 40
    assert refusing.attempts["StoreEvents"] >= 15
    assert client.channel.ejector.ejections(1) == 0


async def test_never_more_than_the_share_is_ejected(pki_dir: Path) -> None:
    good, bad, worse = flaky_storage(0), flaky_storage(10**9), flaky_storage(10**9)
    async with replicas(pki_dir, good, bad, worse) as meshes:
        policy = EjectionPolicy(consecutive_outages=2, max_ejection_percent=50)
        async with client_for(pki_dir, *ports(meshes), ejection=policy) as client:
            codes = await store(client, 40)
            ejected = client.channel.ejector.ejected()
            kept = ({1, 2} - set(ejected)).pop()
            before = (bad, worse)[kept - 1].attempts["StoreEvents"]
            await store(client, 20)
            after = (bad, worse)[kept - 1].attempts["StoreEvents"]
    assert len(ejected) == 1  # one of three, though two fail
    assert after > before  # the failing one past the share keeps its share of calls
    # The good one answers its share and some retries; the budget stops the rest (A6: half
    # the attempts failing spends it), so calls past the share fail rather than storm.
    assert codes.count(grpc.StatusCode.OK) >= 20


async def test_a_slow_replica_is_ejected_by_its_deadlines(pki_dir: Path) -> None:
    fast, slow = flaky_storage(0), flaky_storage(0, delay=0.5)
    async with replicas(pki_dir, fast, slow) as meshes:
        policy = EjectionPolicy(consecutive_outages=2, base_ejection_seconds=30)
        async with client_for(
            pki_dir, *ports(meshes), ejection=policy, method_timeouts={STORE: 0.2}
        ) as client:
            codes = await store(client, 8)
            assert client.channel.ejector.ejected() == [1]
            started = time.monotonic()
            assert set(await store(client, 20)) == {grpc.StatusCode.OK}
            elapsed = time.monotonic() - started
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 2  # DEADLINE_EXCEEDED is not retried
    assert slow.attempts["StoreEvents"] == 2
    assert elapsed < 1.5  # no call waited on the slow one


async def test_an_attempt_timeout_retries_a_slow_replica_s_calls_elsewhere(
    pki_dir: Path,
) -> None:
    """An attempt timeout below the slow replica's answer time: each attempt that meets it is
    cut short and retried on the other one within the call's deadline, so no call fails."""
    fast, slow = flaky_storage(0), flaky_storage(0, delay=0.5)
    async with replicas(pki_dir, fast, slow) as meshes:
        policy = EjectionPolicy(consecutive_outages=2, base_ejection_seconds=30)
        async with client_for(
            pki_dir,
            *ports(meshes),
            ejection=policy,
            retry=RetryPolicy(attempt_timeout_seconds=0.1),
            method_timeouts={STORE: 2.0},
        ) as client:
            codes = await store(client, 10)
            assert client.channel.ejector.ejected() == [1]
    assert set(codes) == {grpc.StatusCode.OK}
    assert slow.attempts["StoreEvents"] == 2  # then ejected
    assert fast.attempts["StoreEvents"] == 10


async def test_a_slow_replica_within_its_deadlines_gets_fewer_calls(pki_dir: Path) -> None:
    """200 ms slower than its peer but inside every deadline: never ejected, yet it holds its
    calls open longer and so gets fewer of them (fewest in flight first)."""
    fast, slow = flaky_storage(0, delay=0.005), flaky_storage(0, delay=0.2)
    async with (
        replicas(pki_dir, fast, slow) as meshes,
        client_for(pki_dir, *ports(meshes)) as client,
    ):
        await store(client, 4)  # both connected
        await asyncio.gather(*(store(client, 10) for _ in range(8)))
        assert client.channel.ejector.ejected() == []
    total = fast.attempts["StoreEvents"] + slow.attempts["StoreEvents"]
    assert total == 84
    assert slow.attempts["StoreEvents"] < total * 0.25  # round robin would give it half


async def test_retries_across_replicas_keep_one_budget(pki_dir: Path) -> None:
    """Both replicas fail every call: after the budget is spent, one attempt per call."""
    first, second = flaky_storage(10**9), flaky_storage(10**9)
    async with (
        replicas(pki_dir, first, second) as meshes,
        client_for(pki_dir, *ports(meshes), ejection=QUICK) as client,
    ):
        codes = await store(client, 40)
    attempts = first.attempts["StoreEvents"] + second.attempts["StoreEvents"]
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    assert 40 < attempts <= 40 + 6  # without the budget: 4 attempts per call, 160


async def test_the_concurrency_limit_fails_fast(pki_dir: Path) -> None:
    slow = flaky_storage(0, delay=0.5)
    async with (
        replicas(pki_dir, slow) as meshes,
        client_for(pki_dir, *ports(meshes), max_in_flight=2) as client,
    ):
        stub = client.stub(storage_pb2_grpc.StorageServiceStub)
        held = [
            asyncio.ensure_future(stub.StoreEvents(storage_pb2.StoreEventsRequest()))
            for _ in range(2)
        ]
        while client.channel.limit.in_flight < 2:
            await asyncio.sleep(0.001)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.StoreEvents(storage_pb2.StoreEventsRequest())
        refused_after = time.monotonic() - started
        replies = await asyncio.gather(*held)
        assert (await stub.StoreEvents(storage_pb2.StoreEventsRequest())).inserted == 1
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refused_after < 0.05
    assert "2 calls in flight" in (caught.value.details() or "")
    status = status_pb2.Status.FromString(
        dict(caught.value.trailing_metadata())[STATUS_DETAILS_KEY]
    )
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == CONCURRENCY_LIMIT_REASON
    assert [reply.inserted for reply in replies] == [1, 1]
    assert slow.attempts["StoreEvents"] == 3  # the refused call never reached it
    assert client.channel.ejector.ejected() == []


async def test_a_deadline_scope_bounds_calls_outside_a_handler(pki_dir: Path) -> None:
    slow = flaky_storage(0, delay=2.0)
    async with replicas(pki_dir, slow) as meshes, client_for(pki_dir, *ports(meshes)) as client:
        stub = client.stub(storage_pb2_grpc.StorageServiceStub)
        started = time.monotonic()
        with deadline_scope(0.3), pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.StoreEvents(storage_pb2.StoreEventsRequest())  # its own timeout: 10 s
        elapsed = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 < elapsed < 1.0


class Downstream(FlakyStorage):
    """Records the time each StoreEvents had left, and whether it was cancelled."""

    def __init__(self, delay: float) -> None:
        super().__init__(0, delay=delay)
        self.remaining: list[float] = []
        self.cancelled = asyncio.Event()

    async def StoreEvents(
        self, request: storage_pb2.StoreEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.StoreEventsResponse:
        left = context.time_remaining()
        assert left is not None, "the mesh client always sends a deadline"
        self.remaining.append(left)
        try:
            return await super().StoreEvents(request, context)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


class Relay(FlakyStorage):
    """Answers StoreEvents by calling the downstream through a mesh client whose own timeout
    (10 s) is longer than any the test's caller gives. MarkDeadLetterReplayed starts a
    background call that waits for the call that started it to end."""

    def __init__(self, downstream: MeshClient) -> None:
        super().__init__(0)
        self.stub = downstream.stub(storage_pb2_grpc.StorageServiceStub)
        self.background: list[asyncio.Future[storage_pb2.StoreEventsResponse]] = []

    async def StoreEvents(
        self, request: storage_pb2.StoreEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.StoreEventsResponse:
        reply: storage_pb2.StoreEventsResponse = await self.stub.StoreEvents(request)
        return reply

    async def MarkDeadLetterReplayed(
        self,
        request: storage_pb2.MarkDeadLetterReplayedRequest,
        context: grpc.aio.ServicerContext,
    ) -> storage_pb2.MarkDeadLetterReplayedResponse:
        async def later() -> storage_pb2.StoreEventsResponse:
            while not context.done():
                await asyncio.sleep(0.01)
            reply: storage_pb2.StoreEventsResponse = await self.stub.StoreEvents(
                storage_pb2.StoreEventsRequest()
            )
            return reply

        self.background.append(asyncio.ensure_future(later()))
        return storage_pb2.MarkDeadLetterReplayedResponse()


def relay_storage(downstream: MeshClient) -> Relay:
    return Relay(downstream)  # type: ignore[abstract]


@asynccontextmanager
async def relay_chain(
    pki_dir: Path, delay: float
) -> AsyncIterator[tuple[Downstream, MeshClient, Relay]]:
    """caller -> relay -> downstream; yields the downstream, the caller's client, the relay."""
    downstream = Downstream(delay)  # type: ignore[abstract]
    async with (
        replicas(pki_dir, downstream) as (down,),
        client_for(pki_dir, down.port) as to_downstream,
        replicas(pki_dir, relay_servicer := relay_storage(to_downstream)) as (relay,),
        client_for(pki_dir, relay.port) as caller,
    ):
        yield downstream, caller, relay_servicer


async def test_the_remaining_time_travels_downstream(pki_dir: Path) -> None:
    async with relay_chain(pki_dir, delay=0.0) as (downstream, caller, _):
        stub = caller.stub(storage_pb2_grpc.StorageServiceStub)
        # Two calls at once with different deadlines: each handler sees its own.
        await asyncio.gather(
            stub.StoreEvents(storage_pb2.StoreEventsRequest(), timeout=1.0),
            stub.StoreEvents(storage_pb2.StoreEventsRequest(), timeout=3.0),
        )
        await stub.StoreEvents(storage_pb2.StoreEventsRequest())  # the caller's default: 10 s
    # The relay's own timeout is 10 s; what reaches the downstream is the caller's. (gRPC
    # rounds a timeout up when it encodes it, by up to about 1%.)
    short, long, default = sorted(downstream.remaining)
    assert 0.5 < short < 1.0 * 1.02
    assert 2.5 < long < 3.0 * 1.02
    assert 9.0 < default < 10.0 * 1.02


async def test_a_cancelled_call_cancels_its_downstream_call(pki_dir: Path) -> None:
    async with relay_chain(pki_dir, delay=5.0) as (downstream, caller, _):
        stub = caller.stub(storage_pb2_grpc.StorageServiceStub)
        call = asyncio.ensure_future(stub.StoreEvents(storage_pb2.StoreEventsRequest()))
        while not downstream.remaining:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        call.cancel()
        await asyncio.wait_for(downstream.cancelled.wait(), 2)
        assert time.monotonic() - started < 1.0
        with pytest.raises(asyncio.CancelledError):
            await call


async def test_a_deadline_passed_downstream_ends_the_downstream_call(pki_dir: Path) -> None:
    async with relay_chain(pki_dir, delay=5.0) as (downstream, caller, _):
        stub = caller.stub(storage_pb2_grpc.StorageServiceStub)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.StoreEvents(storage_pb2.StoreEventsRequest(), timeout=0.3)
        await asyncio.wait_for(downstream.cancelled.wait(), 1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_task_outliving_its_call_is_not_bound_by_its_deadline(pki_dir: Path) -> None:
    """A worker started from a handler (on first use, say) copies the call's context; once the
    call is over its deadline does not hold the worker's calls."""
    async with relay_chain(pki_dir, delay=0.0) as (downstream, caller, relay):
        stub = caller.stub(storage_pb2_grpc.StorageServiceStub)
        await stub.MarkDeadLetterReplayed(storage_pb2.MarkDeadLetterReplayedRequest(), timeout=0.5)
        await asyncio.sleep(0.6)  # past the call's deadline
        reply = await asyncio.wait_for(relay.background[0], 5)
    assert reply.inserted == 1
    assert downstream.remaining[0] > 9.0  # the relay client's own 10 s
