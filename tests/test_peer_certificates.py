"""The identity checks of an internal listener over real mTLS sockets: which client certificates
stand for an identity, what a refusal looks like (status, message, log line, counter), and the
TLS versions the listener accepts."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    TlsMaterial,
    create_channel,
    service_config,
)
from streammesh.mesh.identity import PeerCertificateError, peer_certificate_identity
from tests.certificates import odd_leaf
from tests.conftest import TRUST_DOMAIN
from tests.test_mesh_runtime import echo_server

SERVICE = "streammesh.processor.v1.ProcessorService"
GATEWAY = f"spiffe://{TRUST_DOMAIN}/service/gateway"


@pytest.fixture
async def guarded(pki_dir: Path) -> AsyncIterator[tuple[MeshServer, PeerPolicy]]:
    # The gateway is allowed: a refusal of a gateway id below is the certificate's, not the rule's.
    policy = PeerPolicy.build(TRUST_DOMAIN, {f"{SERVICE}/GetStatus": ["service/gateway"]})
    mesh = echo_server(pki_dir, policy)
    await mesh.start()
    yield mesh, policy
    await mesh.stop(0)


async def status(port: int, material: TlsMaterial) -> processor_pb2.GetStatusResponse:
    channel = create_channel(
        f"127.0.0.1:{port}",
        material,
        server_name="processor",
        config=service_config(SERVICE, health_checked=False),
    )
    async with channel:
        reply: processor_pb2.GetStatusResponse = await processor_pb2_grpc.ProcessorServiceStub(
            channel
        ).GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
        return reply


async def refusal(port: int, material: TlsMaterial) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await status(port, material)
    return caught.value.code(), caught.value.details() or ""


async def test_a_leaf_of_our_ca_with_one_spiffe_id_is_an_identity(
    guarded: tuple[MeshServer, PeerPolicy], pki_dir: Path
) -> None:
    # Control for the refusals below: the same helper, a well-formed leaf, is let through.
    mesh, _ = guarded
    assert (await status(mesh.port, odd_leaf(pki_dir, [GATEWAY]))).consumer == GATEWAY


@pytest.mark.parametrize(
    ("uris", "ca", "problem"),
    [
        (
            [GATEWAY, f"spiffe://{TRUST_DOMAIN}/operator/admin"],
            False,
            "it has 2 URI SANs; exactly one, its SPIFFE id, is required",
        ),
        ([], False, "it has 0 URI SANs"),
        ([GATEWAY], True, "it is a CA certificate (basicConstraints CA:TRUE), not a leaf"),
        (
            ["spiffe://elsewhere.example/service/gateway"],
            False,
            "is not in the trust domain test.streammesh",
        ),
        ([f"spiffe://{TRUST_DOMAIN}/robot/gateway"], False, "is not spiffe://<trust-domain>/"),
    ],
    ids=["two-uri-sans", "no-uri-san", "ca-flag", "other-trust-domain", "unknown-kind"],
)
async def test_certificates_that_are_no_identity_are_refused(
    guarded: tuple[MeshServer, PeerPolicy],
    pki_dir: Path,
    uris: list[str],
    ca: bool,
    problem: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Our CA signed them, so the handshake passes; the guard refuses them before any rule."""
    mesh, policy = guarded
    caplog.set_level(logging.WARNING, logger="streammesh.mesh.policy")
    code, details = await refusal(mesh.port, odd_leaf(pki_dir, uris, ca=ca))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details.startswith("the client certificate is refused: ") and problem in details
    assert policy.denials.total(method=f"/{SERVICE}/GetStatus") == 1
    [record] = caplog.records
    assert problem in record.getMessage() and record.exc_info is None


@pytest.mark.parametrize(
    ("valid_from", "valid_for"),
    [
        (dt.timedelta(hours=-2), dt.timedelta(hours=1)),
        (dt.timedelta(hours=1), dt.timedelta(hours=1)),
    ],
    ids=["expired", "not-yet-valid"],
)
async def test_certificates_outside_their_validity_fail_the_handshake(
    guarded: tuple[MeshServer, PeerPolicy],
    pki_dir: Path,
    valid_from: dt.timedelta,
    valid_for: dt.timedelta,
) -> None:
    mesh, policy = guarded
    material = odd_leaf(pki_dir, [GATEWAY], valid_from=valid_from, valid_for=valid_for)
    code, _ = await refusal(mesh.port, material)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert policy.denials.total() == 0  # no call reached the guard


async def test_a_certificate_of_another_ca_fails_the_handshake(
    guarded: tuple[MeshServer, PeerPolicy], pki_dir: Path, foreign_pki_dir: Path
) -> None:
    mesh, _ = guarded
    foreign = odd_leaf(foreign_pki_dir, [GATEWAY])
    # It trusts our CA, so only the server's verification of the client can fail.
    mixed = TlsMaterial(
        ca=(pki_dir / "ca.pem").read_bytes(),
        certificate_chain=foreign.certificate_chain,
        private_key=foreign.private_key,
    )
    code, _ = await refusal(mesh.port, mixed)
    assert code == grpc.StatusCode.UNAVAILABLE


class _AuthContext:
    """The one thing peer_certificate_identity reads from a call: its auth context."""

    def __init__(self, pem: bytes) -> None:
        self._pem = pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._pem]}


def test_a_certificate_that_expires_during_a_connection_is_refused_from_then_on(
    pki_dir: Path,
) -> None:
    """A connection outlives its handshake: validity is checked at each call."""
    material = odd_leaf(pki_dir, [GATEWAY], valid_for=dt.timedelta(minutes=10))
    context = _AuthContext(material.certificate_chain)
    now = dt.datetime.now(dt.UTC)
    assert peer_certificate_identity(context, TRUST_DOMAIN, now=now) == GATEWAY
    with pytest.raises(PeerCertificateError, match=r"valid from .* only"):
        peer_certificate_identity(context, TRUST_DOMAIN, now=now + dt.timedelta(minutes=6))


async def test_denials_are_permission_denied_logged_once_a_second_and_counted(
    guarded: tuple[MeshServer, PeerPolicy], pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mesh, policy = guarded
    seen: list[tuple[str, str, str]] = []
    policy.denials.hooks.append(lambda *denial: seen.append(denial))
    caplog.set_level(logging.WARNING, logger="streammesh.mesh.policy")
    ingest = f"spiffe://{TRUST_DOMAIN}/service/ingest"
    for _ in range(5):
        code, details = await refusal(mesh.port, TlsMaterial.load(pki_dir, "ingest"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details == (
            f"{ingest} may not call /{SERVICE}/GetStatus (not granted by the peer policy)"
        )
    assert policy.denials.total(identity=ingest) == 5
    assert seen == [(f"/{SERVICE}/GetStatus", ingest, "PEER_NOT_ALLOWED")] * 5
    # Rate-limited (LogThrottle): one line for the burst, no traceback.
    [record] = caplog.records
    assert ingest in record.getMessage() and record.exc_info is None


def _tls_client(pki_dir: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki_dir / "ca.pem")
    context.load_cert_chain(pki_dir / "gateway.pem", pki_dir / "gateway-key.pem")
    context.set_alpn_protocols(["h2"])
    # OpenSSL 3 itself refuses TLS < 1.2 at its default security level; lower it so that the
    # refusal tested is the server's.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # Python deprecates choosing TLS 1.0 and 1.1: we mean to
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = version
    return context


async def _handshake(port: int, context: ssl.SSLContext) -> str | None:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="processor"
    )
    try:
        version: str | None = writer.get_extra_info("ssl_object").version()
        return version
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("version", "negotiated"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
)
async def test_tls_12_and_13_are_accepted(
    guarded: tuple[MeshServer, PeerPolicy], pki_dir: Path, version: ssl.TLSVersion, negotiated: str
) -> None:
    mesh, _ = guarded
    assert await _handshake(mesh.port, _tls_client(pki_dir, version)) == negotiated


async def _old_tls_server(pki_dir: Path) -> asyncio.Server:
    """A plain Python TLS server that accepts TLS 1.0 and up: the control showing that the
    client below really offers the old version."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki_dir / "processor.pem", pki_dir / "processor-key.pem")
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.set_alpn_protocols(["h2"])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)


@pytest.mark.parametrize(
    ("version", "name"), [(ssl.TLSVersion.TLSv1, "TLSv1"), (ssl.TLSVersion.TLSv1_1, "TLSv1.1")]
)
async def test_tls_below_12_is_refused_by_the_server(
    guarded: tuple[MeshServer, PeerPolicy], pki_dir: Path, version: ssl.TLSVersion, name: str
) -> None:
    """grpcio has no setting for the TLS versions of a server; its core's default minimum is
    TLS 1.2 (and maximum 1.3), which this test pins. The server ends such a handshake
    (BoringSSL: UNSUPPORTED_PROTOCOL) by closing the connection."""
    mesh, _ = guarded
    client = _tls_client(pki_dir, version)
    control = await _old_tls_server(pki_dir)
    async with control:
        assert await _handshake(control.sockets[0].getsockname()[1], client) == name
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await _handshake(mesh.port, client)
