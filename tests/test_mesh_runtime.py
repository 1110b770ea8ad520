"""The mesh runtime over real mTLS sockets: identity, default-deny policy, refusal of plaintext and
foreign-CA clients, server pinning, health and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

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
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.identity import peer_identity
from tests.conftest import TRUST_DOMAIN

SERVICE = "streammesh.processor.v1.ProcessorService"


class EchoIdentity(processor_pb2_grpc.ProcessorServiceServicer):
    """Answers with the caller's SPIFFE id; a consumer named "bad" is an invalid argument."""

    async def GetStatus(
        self, request: processor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> processor_pb2.GetStatusResponse:
        identity = peer_identity(context) or ""
        if identity.endswith("/storage"):
            raise InvalidArgument("storage asked", field_violations=[("consumer", "bad")])
        return processor_pb2.GetStatusResponse(consumer=identity)


def echo_server(pki_dir: Path, policy: PeerPolicy) -> MeshServer:
    """A processor listener (built, not started) whose GetStatus echoes the caller's id."""
    binding = ServiceBinding(
        processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
        processor_pb2_grpc.add_ProcessorServiceServicer_to_server,
        EchoIdentity(),
    )
    return create_mesh_server(
        ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN),
        identity="processor",
        bindings=[binding],
        guard=policy,
    )


@pytest.fixture
async def server(pki_dir: Path) -> AsyncIterator[MeshServer]:
    policy = PeerPolicy.build(
        TRUST_DOMAIN, {f"{SERVICE}/GetStatus": ["service/gateway", "service/storage"]}
    )
    mesh = echo_server(pki_dir, policy)
    await mesh.start()
    yield mesh
    await mesh.stop(0)


def _channel(
    port: int, tls_dir: Path, who: str, server_name: str = "processor"
) -> grpc.aio.Channel:
    return create_channel(
        f"127.0.0.1:{port}",
        TlsMaterial.load(tls_dir, who),
        server_name=server_name,
        config=service_config(SERVICE, health_checked=False),
    )


async def _status(channel: grpc.aio.Channel) -> processor_pb2.GetStatusResponse:
    async with channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        response: processor_pb2.GetStatusResponse = await stub.GetStatus(
            processor_pb2.GetStatusRequest(), timeout=5
        )
        return response


async def test_allowed_peer_sees_its_spiffe_id(server: MeshServer, pki_dir: Path) -> None:
    response = await _status(_channel(server.port, pki_dir, "gateway"))
    assert response.consumer == f"spiffe://{TRUST_DOMAIN}/service/gateway"


async def test_operator_is_allowed_only_what_a_rule_names(
    server: MeshServer, pki_dir: Path
) -> None:
    # The fixture's rule names two services, not the operator: nothing is implied for it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _status(_channel(server.port, pki_dir, "admin"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator/admin may not call" in (caught.value.details() or "")
    mesh = echo_server(
        pki_dir, PeerPolicy.build(TRUST_DOMAIN, {f"{SERVICE}/GetStatus": ["operator/admin"]})
    )
    await mesh.start()
    try:
        response = await _status(_channel(mesh.port, pki_dir, "admin"))
        assert response.consumer == f"spiffe://{TRUST_DOMAIN}/operator/admin"
    finally:
        await mesh.stop(0)


async def test_undeclared_peer_is_denied(server: MeshServer, pki_dir: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _status(_channel(server.port, pki_dir, "ingest"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "service/ingest may not call" in (caught.value.details() or "")


async def test_domain_error_maps_to_status_with_field_details(
    server: MeshServer, pki_dir: Path
) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _status(_channel(server.port, pki_dir, "storage"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "consumer"


async def test_plaintext_client_is_refused(server: MeshServer, pki_dir: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _status(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Control: the same address answers a proper mTLS client, so the refusal was the TLS layer.
    assert (await _status(_channel(server.port, pki_dir, "gateway"))).consumer


async def test_client_from_another_ca_is_refused(
    server: MeshServer, pki_dir: Path, foreign_pki_dir: Path
) -> None:
    # The foreign client trusts our CA (so it could verify the server) but presents its own cert.
    foreign = TlsMaterial.load(foreign_pki_dir, "gateway")
    mixed = TlsMaterial(
        ca=TlsMaterial.load(pki_dir, "gateway").ca,
        certificate_chain=foreign.certificate_chain,
        private_key=foreign.private_key,
    )
    channel = create_channel(
        f"127.0.0.1:{server.port}",
        mixed,
        server_name="processor",
        config=service_config(SERVICE, health_checked=False),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _status(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await _status(_channel(server.port, pki_dir, "gateway"))).consumer


async def test_client_pins_the_expected_service(server: MeshServer, pki_dir: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _status(_channel(server.port, pki_dir, "gateway", server_name="storage"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await _status(_channel(server.port, pki_dir, "gateway"))).consumer


async def test_health_and_reflection(server: MeshServer, pki_dir: Path) -> None:
    async with _channel(server.port, pki_dir, "ingest") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = set()
        async for answer in stub.ServerReflectionInfo(iter([request]), timeout=5):
            names = {s.name for s in answer.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_graceful_stop_reports_not_serving(pki_dir: Path) -> None:
    mesh = create_mesh_server(
        ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN),
        identity="processor",
        bindings=[],
        guard=PeerPolicy.build(TRUST_DOMAIN, {}),
    )
    await mesh.start()
    await mesh.health.enter_graceful_shutdown()
    async with _channel(mesh.port, pki_dir, "gateway") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await mesh.stop(0)


async def test_round_robin_spreads_calls_and_skips_unhealthy_replicas(pki_dir: Path) -> None:
    from grpc_health.v1 import health_pb2 as hp

    policy = PeerPolicy.build(TRUST_DOMAIN, {f"{SERVICE}/GetStatus": ["service/gateway"]})
    replicas = []
    for _ in range(2):
        counter = CountingServicer()
        binding = ServiceBinding(
            processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
            processor_pb2_grpc.add_ProcessorServiceServicer_to_server,
            counter,
        )
        mesh = create_mesh_server(
            ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN),
            identity="processor",
            bindings=[binding],
            guard=policy,
        )
        await mesh.start()
        replicas.append((mesh, counter))
    target = ",".join(f"127.0.0.1:{mesh.port}" for mesh, _ in replicas)
    channel = create_channel(
        target,
        TlsMaterial.load(pki_dir, "gateway"),
        server_name="processor",
        config=service_config(SERVICE),
    )
    try:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        for _ in range(20):
            await stub.GetStatus(processor_pb2.GetStatusRequest(), wait_for_ready=True, timeout=5)
        first, second = (c.calls for _, c in replicas)
        assert first >= 5 and second >= 5, (first, second)  # both replicas take traffic
        await replicas[0][0].health.set(SERVICE, hp.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(0.3)  # the health watch stream delivers the change
        for _ in range(20):
            await stub.GetStatus(processor_pb2.GetStatusRequest(), wait_for_ready=True, timeout=5)
        assert [c.calls for _, c in replicas] == [first, second + 20]
    finally:
        await channel.close()
        for mesh, _ in replicas:
            await mesh.stop(0)


class CountingServicer(processor_pb2_grpc.ProcessorServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def GetStatus(
        self, request: processor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> processor_pb2.GetStatusResponse:
        self.calls += 1
        return processor_pb2.GetStatusResponse()


def test_ca_key_is_kept_out_of_the_service_folder(pki_dir: Path) -> None:
    from streammesh.mesh.pki import ca_key_dir

    assert not (pki_dir / "ca-key.pem").exists()
    key = ca_key_dir(pki_dir) / "ca-key.pem"
    assert key.exists() and key.stat().st_mode & 0o077 == 0
    for name in ("gateway", "admin"):
        assert (pki_dir / f"{name}-key.pem").stat().st_mode & 0o077 == 0
