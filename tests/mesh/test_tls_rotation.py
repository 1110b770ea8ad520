"""Certificate rotation in one process, over real mTLS sockets: two listeners built by the server
factory (dynamic credentials) and one mesh client over both (channel swap), under steady calls
and with a stream open across the swap; then a CA rotation with its overlap; new material the
server does not trust; and a rotation caught between its two renames.

Every loop is bounded in calls and seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc
from streammesh.mesh import MeshServer, PeerPolicy, ServiceBinding, ServiceSettings
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles
from streammesh.mesh.pki import CA_FILE, init_pki, issue_leaf
from streammesh.mesh.pki_rotation import begin_ca_rotation, finish_ca_rotation, rotate_leaves
from streammesh.mesh.server import create_mesh_server
from streammesh.mesh.tls_reload import ReloadingSslContext, ServerCredentialsReloader
from tests.certificates import served_certificate
from tests.conftest import TRUST_DOMAIN

PROCESSOR = processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"]
LIFETIME = dt.timedelta(minutes=10)


class PeerSerial(processor_pb2_grpc.ProcessorServiceServicer):
    """Answers with the serial (hex) of the client certificate the call came with."""

    async def GetStatus(
        self, request: processor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> processor_pb2.GetStatusResponse:
        pem = context.auth_context()["x509_pem_cert"][0]
        serial = x509.load_pem_x509_certificate(bytes(pem)).serial_number
        return processor_pb2.GetStatusResponse(consumer=f"{serial:x}")


@dataclass
class Load:
    """Steady GetStatus calls from a few workers until `done`; each reply's client serial."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stub: processor_pb2_grpc.ProcessorServiceStub, limit: int) -> None:
        for _ in range(limit):
            if self.done.is_set():
                return
            try:
                reply = await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
            except grpc.aio.AioRpcError as error:
                self.failed.append(f"{error.code().name}: {error.details()}")
            else:
                self.ok += 1
                self.serials.append(reply.consumer)
            await asyncio.sleep(0.002)

    def start(self, client: MeshClient, limit: int) -> list[asyncio.Task[None]]:
        """Four workers calling through `client`, each at most `limit` times."""
        stub = client.stub(processor_pb2_grpc.ProcessorServiceStub)
        return [asyncio.create_task(self.run(stub, limit)) for _ in range(4)]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    init_pki(directory, trust_domain=TRUST_DOMAIN, leaf_lifetime=LIFETIME)
    return directory


@pytest.fixture
async def servers(pki: Path) -> AsyncIterator[list[MeshServer]]:
    """Two processor listeners reading their material from `pki`."""
    policy = PeerPolicy.build(
        TRUST_DOMAIN, {f"{PROCESSOR.full_name}/GetStatus": ["service/gateway"]}
    )
    binding = ServiceBinding(
        PROCESSOR, processor_pb2_grpc.add_ProcessorServiceServicer_to_server, PeerSerial()
    )
    meshes = [
        create_mesh_server(
            ServiceSettings(tls_dir=pki, trust_domain=TRUST_DOMAIN),
            identity="processor",
            bindings=[binding],
            guard=policy,
        )
        for _ in range(2)
    ]
    for mesh in meshes:
        await mesh.start()
    yield meshes
    for mesh in meshes:
        await mesh.stop(0)


@pytest.fixture
async def client(pki: Path, servers: list[MeshServer]) -> AsyncIterator[MeshClient]:
    config = MeshClientConfig(
        server_name="processor",
        targets=tuple(f"127.0.0.1:{mesh.port}" for mesh in servers),
        tls=TlsFiles.of(pki, "gateway"),
        services=(PROCESSOR,),
        timeout_seconds=5,
        tls_reload_seconds=0.2,
    )
    mesh_client = MeshClient(config)
    await asyncio.wait_for(mesh_client.channel.channel_ready(), 10)
    yield mesh_client
    await mesh_client.close()


def serial_of(path: Path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"


async def until(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.05)


async def fresh_server_serial(pki: Path, port: int) -> str:
    cert = await served_certificate(
        port,
        pki / CA_FILE,
        server_name="processor",
        client=(pki / "gateway.pem", pki / "gateway-key.pem"),
    )
    return f"{cert.serial_number:x}"


async def test_rotated_leaves_are_taken_without_a_failed_call_and_old_streams_finish(
    pki: Path, servers: list[MeshServer], client: MeshClient
) -> None:
    load = Load()
    workers = load.start(client, limit=3000)
    # A stream open across the swap: health Watch of the overall status on the first replica.
    watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert (await asyncio.wait_for(watch.read(), 5)).status == serving
    old_client_serial = serial_of(pki / "gateway.pem")
    old_generation = client.channel.generation
    await until(lambda: load.ok >= 50, "50 calls before the rotation")

    rotate_leaves(pki, lifetime=LIFETIME)
    # Servers: the very next connection gets the new certificate.
    for mesh in servers:
        assert await fresh_server_serial(pki, mesh.port) == serial_of(pki / "processor.pem")
    assert client.reloader is not None
    await until(lambda: client.reloader is not None and client.reloader.swaps == 1, "the swap")
    swapped_at = load.ok
    await until(lambda: load.ok >= swapped_at + 100, "100 calls after the swap")
    # The stream still runs on the old channels: it sees a change of the server's health.
    assert client.channel.draining == 1 and old_generation.in_flight == 1
    for mesh in servers:
        await mesh.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    update = await asyncio.wait_for(watch.read(), 5)
    assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    # Its end drains the old generation: its channels close.
    await until(lambda: client.channel.draining == 0, "the old channels to close")
    shutdown = grpc.ChannelConnectivity.SHUTDOWN
    assert all(channel.get_state() == shutdown for channel in old_generation.channels)
    load.done.set()
    await asyncio.gather(*workers)

    assert load.failed == [], load.failed[:3]
    new_client_serial = serial_of(pki / "gateway.pem")
    # Calls after the swap present the new client certificate, and only it.
    assert set(load.serials[-50:]) == {new_client_serial}
    assert old_client_serial in load.serials[:50]


async def test_ca_rotation_with_overlap_keeps_every_call(
    pki: Path, servers: list[MeshServer], client: MeshClient
) -> None:
    load = Load()
    workers = load.start(client, limit=5000)
    old_ca = (pki / CA_FILE).read_bytes()
    await until(lambda: load.ok >= 50, "50 calls before the rotation")
    assert client.reloader is not None
    steps: list[Callable[[], object]] = [
        lambda: begin_ca_rotation(pki, trust_domain=TRUST_DOMAIN),
        lambda: rotate_leaves(pki, lifetime=LIFETIME),
        lambda: finish_ca_rotation(pki),
    ]
    reloader = client.reloader
    for number, step in enumerate(steps, start=1):
        step()
        await until(partial(lambda n: reloader.swaps == n, number), f"swap {number}")
        await until(partial(lambda m: load.ok >= m + 50, load.ok), f"50 calls after {number}")
    load.done.set()
    await asyncio.gather(*workers)
    assert load.failed == [], load.failed[:3]
    assert set(load.serials[-50:]) == {serial_of(pki / "gateway.pem")}

    new_ca = x509.load_pem_x509_certificates((pki / CA_FILE).read_bytes())
    assert len(new_ca) == 1, "the old CA was dropped"
    assert new_ca[0] not in x509.load_pem_x509_certificates(old_ca), "the new one kept"
    # A fresh connection: the server presents a leaf of the new CA ...
    served = await served_certificate(
        servers[0].port,
        pki / CA_FILE,
        server_name="processor",
        client=(pki / "gateway.pem", pki / "gateway-key.pem"),
    )
    served.verify_directly_issued_by(new_ca[0])
    # ... which a client that trusts only the old CA refuses.
    old_only = pki.parent / "old-ca.pem"
    old_only.write_bytes(old_ca)
    with pytest.raises(ssl.SSLCertVerificationError):
        await served_certificate(servers[0].port, old_only, server_name="processor")


async def test_material_the_server_does_not_trust_keeps_the_old_channels(
    pki: Path, servers: list[MeshServer], client: MeshClient, tmp_path: Path
) -> None:
    # A client certificate of another CA: the servers refuse it at the handshake.
    foreign = tmp_path / "foreign"
    init_pki(foreign, trust_domain=TRUST_DOMAIN)
    for suffix in ("-key.pem", ".pem"):
        (pki / f"gateway{suffix}").write_bytes((foreign / f"gateway{suffix}").read_bytes())
    assert await client.reload_tls() is False  # the new channels' handshakes failed
    stub = client.stub(processor_pb2_grpc.ProcessorServiceStub)
    reply = await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
    assert reply.consumer != serial_of(pki / "gateway.pem")  # still the old certificate
    assert client.channel.generation.number == 1


async def test_a_rotation_between_its_two_renames_is_not_taken(pki: Path) -> None:
    reloader = ServerCredentialsReloader(pki, "storage", require_client_cert=True)
    before = reloader.material.certificate_chain
    # issue_leaf writes the key first: read here, the pair does not match.
    new_key = pki.parent / "new"
    init_pki(new_key, trust_domain=TRUST_DOMAIN)
    (pki / "storage-key.pem").write_bytes((new_key / "storage-key.pem").read_bytes())
    assert reloader.fetch() is None
    assert reloader.material.certificate_chain == before and reloader.reloads == 0
    issue_leaf(pki, file_name="storage", spiffe_id=f"spiffe://{TRUST_DOMAIN}/service/storage")
    assert reloader.fetch() is not None
    assert reloader.reloads == 1 and reloader.material.certificate_chain != before
    assert reloader.fetch() is None  # unchanged since: nothing to take


async def test_a_plain_ssl_listener_takes_a_rotated_certificate_at_the_next_handshake(
    pki: Path,
) -> None:
    """ReloadingSslContext, as the gateway's JWKS-over-HTTPS listener uses it."""
    reloading = ReloadingSslContext(pki / "gateway.pem", pki / "gateway-key.pem")

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=reloading.context)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cafile=str(pki / CA_FILE))

    async def served_serial() -> str:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="gateway"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return f"{x509.load_der_x509_certificate(der).serial_number:x}"

    try:
        assert await served_serial() == serial_of(pki / "gateway.pem")
        rotate_leaves(pki, lifetime=LIFETIME)
        assert await served_serial() == serial_of(pki / "gateway.pem")
        assert reloading.reloads == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_closing_the_client_closes_old_channels_a_stream_still_holds(
    pki: Path, client: MeshClient
) -> None:
    watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest())
    assert (
        await asyncio.wait_for(watch.read(), 5)
    ).status == health_pb2.HealthCheckResponse.SERVING
    old_generation = client.channel.generation
    rotate_leaves(pki, lifetime=LIFETIME)
    assert await client.reload_tls() is True
    assert client.channel.draining == 1  # the stream holds the old channels open
    await client.close()
    assert client.channel.draining == 0
    shutdown = grpc.ChannelConnectivity.SHUTDOWN
    assert all(channel.get_state() == shutdown for channel in old_generation.channels)
    # Closed with grace None: the stream was cancelled (grpc.aio raises CancelledError for it).
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(watch.read(), 5)
    assert watch.done() and await watch.code() == grpc.StatusCode.CANCELLED
