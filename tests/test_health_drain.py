"""Health that follows dependencies, and the drain, on in-process servers over real mTLS: a
server whose Postgres or Redis (reached through a TCP proxy the test cuts) goes away reports
NOT_SERVING and SERVING again once it is back; a draining server says NOT_SERVING, still serves
during its drain delay, and lets a call in flight finish."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceBinding,
    ServiceSettings,
    TlsMaterial,
    create_channel,
    create_mesh_server,
    service_config,
)
from streammesh.mesh.health import DependencyWatcher, postgres_check, redis_check
from tests.conftest import TRUST_DOMAIN
from tests.tcp_proxy import TcpProxy

SERVICE = "streammesh.processor.v1.ProcessorService"
Serving = health_pb2.HealthCheckResponse.ServingStatus


class SlowStatus(processor_pb2_grpc.ProcessorServiceServicer):
    """GetStatus takes `delay` seconds; counts the calls it finished."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.finished = 0

    async def GetStatus(
        self, request: processor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> processor_pb2.GetStatusResponse:
        await asyncio.sleep(self.delay)
        self.finished += 1
        return processor_pb2.GetStatusResponse(consumer="slow")


def _server(
    pki_dir: Path, servicer: SlowStatus, *, interval: float = 1.0, timeout: float = 1.0
) -> MeshServer:
    settings = ServiceSettings(
        tls_dir=pki_dir,
        trust_domain=TRUST_DOMAIN,
        health_interval_seconds=interval,
        health_timeout_seconds=timeout,
    )
    return create_mesh_server(
        settings,
        identity="processor",
        bindings=[
            ServiceBinding(
                processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
                processor_pb2_grpc.add_ProcessorServiceServicer_to_server,
                servicer,
            )
        ],
        guard=PeerPolicy.build(TRUST_DOMAIN, {f"{SERVICE}/GetStatus": ["service/gateway"]}),
    )


def _channel(pki_dir: Path, port: int, *, health_checked: bool = False) -> grpc.aio.Channel:
    return create_channel(
        f"127.0.0.1:{port}",
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="processor",
        config=service_config(SERVICE, health_checked=health_checked),
    )


async def _health(channel: grpc.aio.Channel) -> str:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
    )
    return str(Serving.Name(reply.status))


async def _wait_health(channel: grpc.aio.Channel, wanted: str, within: float = 10) -> float:
    """Seconds until the server's health for SERVICE is `wanted` (fails after `within`)."""
    start = time.monotonic()
    while (status := await _health(channel)) != wanted:
        assert time.monotonic() - start < within, f"still {status} after {within}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture
async def proxies(database_url: str, redis_url: str) -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    """A proxy to the tests' Postgres and one to their Redis."""
    pg, rd = make_url(database_url), make_url(redis_url)
    postgres = TcpProxy(pg.host or "127.0.0.1", pg.port or 5432)
    redis = TcpProxy(rd.host or "127.0.0.1", rd.port or 6379)
    await postgres.start()
    await redis.start()
    yield postgres, redis
    await postgres.close()
    await redis.close()


async def test_health_follows_postgres_and_redis(
    pki_dir: Path, database_url: str, redis_url: str, proxies: tuple[TcpProxy, TcpProxy]
) -> None:
    postgres, redis = proxies
    pg_url = make_url(database_url).set(port=postgres.port).render_as_string(hide_password=False)
    rd_url = make_url(redis_url).set(port=redis.port).render_as_string(hide_password=False)
    mesh = _server(pki_dir, SlowStatus(), interval=0.2, timeout=0.5)
    watcher = mesh.watch_dependencies(postgres_check(pg_url), redis_check(rd_url))
    await mesh.start()
    channel = _channel(pki_dir, mesh.port)
    try:
        assert await _health(channel) == "SERVING"
        for proxy, what in ((postgres, "Postgres"), (redis, "Redis")):
            await proxy.cut()
            await _wait_health(channel, "NOT_SERVING", within=5)
            assert [name.split(" ")[0] for name in watcher.failing] == [what]
            # The listener itself still answers: the process is up, its dependency is not.
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await proxy.restore()
            await _wait_health(channel, "SERVING", within=5)
            assert watcher.failing == {}
    finally:
        await channel.close()
        await mesh.stop(0)


async def test_watcher_reports_nothing_once_draining(pki_dir: Path) -> None:
    """A draining server stays NOT_SERVING even though its dependencies answer."""
    mesh = _server(pki_dir, SlowStatus())
    watcher = DependencyWatcher(mesh.health, mesh.service_names, [], interval=0.1)
    await mesh.start()
    await mesh.health.enter_graceful_shutdown()
    assert await watcher.check_once()  # no check fails...
    channel = _channel(pki_dir, mesh.port)
    try:
        assert await _health(channel) == "NOT_SERVING"  # ...and the drain still wins
    finally:
        await channel.close()
        await mesh.stop(0)


async def test_drain_says_not_serving_then_finishes_calls_in_flight(pki_dir: Path) -> None:
    servicer = SlowStatus(delay=1.0)
    mesh = _server(pki_dir, servicer)
    await mesh.start()
    # A health-checked channel, as services build them: its Watch stream makes the drain wait.
    channel = _channel(pki_dir, mesh.port, health_checked=True)
    stub = processor_pb2_grpc.ProcessorServiceStub(channel)
    try:
        await stub.GetStatus(processor_pb2.GetStatusRequest(), wait_for_ready=True, timeout=5)
        assert mesh.health.watching == 1
        in_flight = asyncio.ensure_future(
            stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=10)
        )
        await asyncio.sleep(0.2)  # the call has reached the handler
        started = time.monotonic()
        stopping = asyncio.create_task(mesh.stop(5, delay=0.5))
        await asyncio.sleep(0.1)
        # During the drain delay: NOT_SERVING, yet a call that arrives is still served (from
        # a client that does not check health: the health-checked channel no longer picks it).
        late_channel = _channel(pki_dir, mesh.port)
        try:
            assert await _health(late_channel) == "NOT_SERVING"
            servicer.delay = 0.0
            late = await processor_pb2_grpc.ProcessorServiceStub(late_channel).GetStatus(
                processor_pb2.GetStatusRequest(), timeout=5
            )
        finally:
            await late_channel.close()
        assert late.consumer == "slow"
        with pytest.raises(grpc.aio.AioRpcError) as unpicked:
            await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=2)
        assert "backend unhealthy" in str(unpicked.value.details())
        assert (await in_flight).consumer == "slow"
        assert await stopping == 0.5
        took = time.monotonic() - started
        # The stop waited for the call in flight (0.8 s left of it) and the delay, not the
        # whole 5 s grace: the open health watch stream did not hold it.
        assert 0.5 <= took < 2.5, took
        assert servicer.finished == 3
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()


async def test_drain_skips_its_delay_when_no_client_watches_health(pki_dir: Path) -> None:
    mesh = _server(pki_dir, SlowStatus())
    await mesh.start()
    channel = _channel(pki_dir, mesh.port)  # calls, but no health-checked balancing
    try:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
        assert mesh.health.watching == 0
        started = time.monotonic()
        assert await mesh.stop(5, delay=3) == 0.0
        assert time.monotonic() - started < 1.5
    finally:
        await channel.close()
