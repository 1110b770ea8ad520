"""The mesh client over real mTLS sockets: retries as the protos declare them (idempotent methods
retried on UNAVAILABLE, others never), the retry budget, per-method timeouts, and round_robin
that skips a replica whose health is NOT_SERVING."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

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
from streammesh.mesh.derived_config import RetryPolicy
from streammesh.mesh.errors import ResourceExhausted, Unavailable
from tests.conftest import TRUST_DOMAIN

SERVICE = storage_pb2.DESCRIPTOR.services_by_name["StorageService"]
STORE = f"{SERVICE.full_name}/StoreEvents"  # IDEMPOTENT in storage.proto
MARK = f"{SERVICE.full_name}/MarkDeadLetterReplayed"  # not declared: never retried


class FlakyStorage(storage_pb2_grpc.StorageServiceServicer):
    """Fails the first `failures` calls of each method with `error`, then answers; counts every
    attempt that reached it. Only StoreEvents and MarkDeadLetterReplayed are served (the rest
    answer UNIMPLEMENTED, as the generated base class does): build it with `flaky_storage`."""

    def __init__(
        self,
        failures: int,
        error: Callable[[str], Exception] = Unavailable,
        delay: float = 0.0,
    ) -> None:
        self.failures = failures
        self.error = error
        self.delay = delay
        self.attempts: Counter[str] = Counter()

    def _attempt(self, method: str) -> None:
        self.attempts[method] += 1
        if self.attempts[method] <= self.failures:
            raise self.error(f"{method} attempt {self.attempts[method]} refused by the test")

    async def StoreEvents(
        self, request: storage_pb2.StoreEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.StoreEventsResponse:
        self._attempt("StoreEvents")
        await asyncio.sleep(self.delay)
        return storage_pb2.StoreEventsResponse(inserted=1)

    async def MarkDeadLetterReplayed(
        self,
        request: storage_pb2.MarkDeadLetterReplayedRequest,
        context: grpc.aio.ServicerContext,
    ) -> storage_pb2.MarkDeadLetterReplayedResponse:
        self._attempt("MarkDeadLetterReplayed")
        return storage_pb2.MarkDeadLetterReplayedResponse()


def flaky_storage(
    failures: int, error: Callable[[str], Exception] = Unavailable, delay: float = 0.0
) -> FlakyStorage:
    return FlakyStorage(failures, error, delay)  # type: ignore[abstract]


async def start_storage(pki_dir: Path, servicer: FlakyStorage, port: int = 0) -> MeshServer:
    policy = PeerPolicy.build(TRUST_DOMAIN, {f"{SERVICE.full_name}/*": ["service/processor"]})
    mesh = create_mesh_server(
        ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, host="127.0.0.1", port=port),
        identity="storage",
        bindings=[
            ServiceBinding(SERVICE, storage_pb2_grpc.add_StorageServiceServicer_to_server, servicer)
        ],
        guard=policy,
    )
    await mesh.start()
    return mesh


def client_for(pki_dir: Path, *ports: int, **options: object) -> MeshClient:
    config = MeshClientConfig(
        server_name="storage",
        targets=tuple(f"127.0.0.1:{port}" for port in ports),
        tls=TlsFiles.of(pki_dir, "processor"),
        services=(SERVICE,),
        timeout_seconds=10,
        **options,  # type: ignore[arg-type]
    )
    return MeshClient(config)


@pytest.fixture
async def flaky(pki_dir: Path) -> AsyncIterator[tuple[FlakyStorage, MeshServer]]:
    servicer = flaky_storage(failures=2)
    mesh = await start_storage(pki_dir, servicer)
    yield servicer, mesh
    await mesh.stop(0)


async def test_idempotent_method_is_retried_until_it_succeeds(
    flaky: tuple[FlakyStorage, MeshServer], pki_dir: Path
) -> None:
    servicer, mesh = flaky
    async with client_for(pki_dir, mesh.port) as client:
        stub = client.stub(storage_pb2_grpc.StorageServiceStub)
        reply = await stub.StoreEvents(storage_pb2.StoreEventsRequest())
    assert reply.inserted == 1
    assert servicer.attempts["StoreEvents"] == 3  # two UNAVAILABLE, then the answer


async def test_non_idempotent_method_is_not_retried(
    flaky: tuple[FlakyStorage, MeshServer], pki_dir: Path
) -> None:
    servicer, mesh = flaky
    async with client_for(pki_dir, mesh.port) as client:
        stub = client.stub(storage_pb2_grpc.StorageServiceStub)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.MarkDeadLetterReplayed(storage_pb2.MarkDeadLetterReplayedRequest(id=1))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts["MarkDeadLetterReplayed"] == 1


async def test_attempts_stop_at_max_attempts(pki_dir: Path) -> None:
    servicer = flaky_storage(failures=100)
    mesh = await start_storage(pki_dir, servicer)
    try:
        async with client_for(pki_dir, mesh.port, retry=RetryPolicy(max_attempts=3)) as client:
            stub = client.stub(storage_pb2_grpc.StorageServiceStub)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.StoreEvents(storage_pb2.StoreEventsRequest())
    finally:
        await mesh.stop(0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.attempts["StoreEvents"] == 3


async def test_a_code_unsafe_to_retry_is_not_retried(pki_dir: Path) -> None:
    # RESOURCE_EXHAUSTED is back-pressure: retrying would defeat it, even for an idempotent call.
    servicer = flaky_storage(failures=1, error=ResourceExhausted)
    mesh = await start_storage(pki_dir, servicer)
    try:
        async with client_for(pki_dir, mesh.port) as client:
            stub = client.stub(storage_pb2_grpc.StorageServiceStub)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.StoreEvents(storage_pb2.StoreEventsRequest())
    finally:
        await mesh.stop(0)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.attempts["StoreEvents"] == 1


async def test_retry_budget_holds_attempts_near_the_offered_load(pki_dir: Path) -> None:
    """A backend failing every call: after the first few calls spent the token bucket (10
    tokens, a failure costs one, retries stop at half), each call is one attempt."""
    servicer = flaky_storage(failures=10_000)
    mesh = await start_storage(pki_dir, servicer)
    calls = 40
    try:
        async with client_for(pki_dir, mesh.port) as client:
            stub = client.stub(storage_pb2_grpc.StorageServiceStub)
            for _ in range(calls):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.StoreEvents(storage_pb2.StoreEventsRequest())
            before = servicer.attempts["StoreEvents"]
            for _ in range(10):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.StoreEvents(storage_pb2.StoreEventsRequest())
    finally:
        await mesh.stop(0)
    # Without the budget: 4 attempts per call, 160 for the first 40 calls.
    assert calls < before <= calls + 5
    assert servicer.attempts["StoreEvents"] - before == 10  # throttled: one attempt per call


async def test_method_timeout_below_a_second_is_honoured(pki_dir: Path) -> None:
    # A service-config timeout this short fails every call at once on grpcio 1.85 (see
    # derived_config.py); the mesh client sets it per call instead.
    servicer = flaky_storage(failures=0, delay=1.0)
    mesh = await start_storage(pki_dir, servicer)
    try:
        async with client_for(pki_dir, mesh.port, method_timeouts={STORE: 0.3}) as client:
            stub = client.stub(storage_pb2_grpc.StorageServiceStub)
            await stub.MarkDeadLetterReplayed(storage_pb2.MarkDeadLetterReplayedRequest(id=1))
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.StoreEvents(storage_pb2.StoreEventsRequest())
            elapsed = time.monotonic() - started
            servicer.delay = 0.1
            assert (await stub.StoreEvents(storage_pb2.StoreEventsRequest())).inserted == 1
    finally:
        await mesh.stop(0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 <= elapsed < 0.9


async def test_round_robin_skips_a_replica_that_is_not_serving(pki_dir: Path) -> None:
    first, second = flaky_storage(failures=0), flaky_storage(failures=0)
    meshes = [await start_storage(pki_dir, first), await start_storage(pki_dir, second)]
    try:
        await meshes[1].health.set(SERVICE.full_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        async with client_for(pki_dir, *(m.port for m in meshes)) as client:
            stub = client.stub(storage_pb2_grpc.StorageServiceStub)
            for _ in range(20):
                await stub.StoreEvents(storage_pb2.StoreEventsRequest())
            assert (first.attempts["StoreEvents"], second.attempts["StoreEvents"]) == (20, 0)
            # Serving again: it rejoins the rotation.
            await meshes[1].health.set(SERVICE.full_name, health_pb2.HealthCheckResponse.SERVING)
            deadline = time.monotonic() + 5
            while second.attempts["StoreEvents"] == 0 and time.monotonic() < deadline:
                await stub.StoreEvents(storage_pb2.StoreEventsRequest())
                await asyncio.sleep(0.01)
    finally:
        for mesh in meshes:
            await mesh.stop(0)
    assert second.attempts["StoreEvents"] > 0


async def test_a_pre_serialized_call_is_retried_and_timed_too(
    flaky: tuple[FlakyStorage, MeshServer], pki_dir: Path
) -> None:
    """The processor's StoreEvents shape: its own multi-callable on `client.channel`, request
    bytes as they are. The retry policy and the default deadline apply to it as to a stub."""
    servicer, mesh = flaky
    async with client_for(pki_dir, mesh.port, method_timeouts={STORE: 5}) as client:
        store = client.channel.unary_unary(
            f"/{STORE}",
            request_serializer=None,
            response_deserializer=storage_pb2.StoreEventsResponse.FromString,
        )
        reply = await store(storage_pb2.StoreEventsRequest().SerializeToString())
    assert reply.inserted == 1
    assert servicer.attempts["StoreEvents"] == 3


class FlakyIngest(ingest_pb2_grpc.IngestServiceServicer):
    """Publish: the first stream reads one batch and fails UNAVAILABLE before acknowledging
    anything; later streams acknowledge every batch. Records the batches each stream read."""

    def __init__(self) -> None:
        self.streams: list[list[int]] = []

    async def Publish(
        self,
        request_iterator: AsyncIterator[ingest_pb2.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ingest_pb2.PublishResponse]:
        read: list[int] = []
        self.streams.append(read)
        async for request in request_iterator:
            read.append(request.sequence)
            if len(self.streams) == 1:
                raise Unavailable("the first stream fails before its first acknowledgement")
            yield ingest_pb2.PublishResponse(sequence=request.sequence, accepted=1)

    async def PublishBatch(
        self, request: ingest_pb2.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.PublishBatchResponse:
        raise Unavailable("not served by this test")


async def test_a_stream_is_retried_until_its_first_response(pki_dir: Path) -> None:
    """Publish is IDEMPOTENT: gRPC replays the batches it buffered on a new attempt, as long as
    no acknowledgement arrived (after one, the call is committed and a failure ends it)."""
    ingest = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
    servicer = FlakyIngest()
    mesh = create_mesh_server(
        ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, host="127.0.0.1", port=0),
        identity="ingest",
        bindings=[
            ServiceBinding(
                ingest,
                ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                servicer,
            )
        ],
        guard=PeerPolicy.build(TRUST_DOMAIN, {f"{ingest.full_name}/*": ["service/gateway"]}),
    )
    await mesh.start()
    try:
        config = MeshClientConfig(
            server_name="ingest",
            targets=(f"127.0.0.1:{mesh.port}",),
            tls=TlsFiles.of(pki_dir, "gateway"),
            services=(ingest,),
        )
        async with MeshClient(config) as client:
            call = client.stub(ingest_pb2_grpc.IngestServiceStub).Publish(timeout=10)
            await call.write(ingest_pb2.PublishRequest(sequence=1))
            await call.write(ingest_pb2.PublishRequest(sequence=2))
            await call.done_writing()
            acks = [ack.sequence async for ack in call]
    finally:
        await mesh.stop(0)
    assert acks == [1, 2]
    assert servicer.streams[0] == [1]
    assert servicer.streams[1] == [1, 2]  # the batches replayed on the second attempt
