"""With auth down, refusals still answer at once and the lost audit events are counted: the
audit trail never stands in the request path."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.gateway.audit import AuditTrail
from services.gateway.server import (
    create_audit_trail,
    create_revocation_follower,
    create_server,
)
from services.gateway.settings import GatewaySettings
from services.gateway.tokens import INVALID_TOKEN
from services.gateway.upstream import Upstreams
from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from streammesh.mesh.client import TlsFiles
from tests.conftest import TRUST_DOMAIN
from tests.gateway.conftest import gateway_channel


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def lonely_gateway(pki_dir: Path) -> AsyncIterator[tuple[grpc.aio.Channel, AuditTrail]]:
    """A gateway whose auth, ingest and storage are all unreachable."""
    dead = f"127.0.0.1:{_closed_port()}"
    settings = GatewaySettings(
        port=0,
        tls_dir=pki_dir,
        trust_domain=TRUST_DOMAIN,
        auth_target=dead,
        ingest_target=dead,
        storage_target=dead,
        audit_queue_size=5,
        audit_timeout_seconds=0.5,
    )
    upstreams = Upstreams(settings, TlsFiles.of(pki_dir, "gateway"))
    audit = create_audit_trail(settings, upstreams)
    revocations, follower = create_revocation_follower(settings, upstreams)
    follower.start()
    mesh = create_server(settings, upstreams, audit, revocations)
    await mesh.start()
    channel = gateway_channel(mesh.port, pki_dir)
    yield channel, audit
    await channel.close()
    await mesh.stop(0)
    await follower.close()
    await audit.close(timeout=1)
    await upstreams.close()


async def test_refusals_answer_at_once_while_auth_is_down(
    lonely_gateway: tuple[grpc.aio.Channel, AuditTrail],
) -> None:
    channel, audit = lonely_gateway
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    started = time.monotonic()
    for _ in range(50):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.QueryEvents(gateway_pb2.QueryEventsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == INVALID_TOKEN
    assert time.monotonic() - started < 5
    # Queue of 5: most were dropped at once, the rest as auth failed to take them.
    deadline = time.monotonic() + 10
    while audit.dropped < 50 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (audit.sent, audit.dropped) == (0, 50)


async def test_without_keys_a_token_check_is_unavailable_not_unauthenticated(
    lonely_gateway: tuple[grpc.aio.Channel, AuditTrail],
) -> None:
    """A well-formed token cannot be checked while auth never answered: UNAVAILABLE (retry
    later), not a refusal, and not audited as one."""
    channel, audit = lonely_gateway
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    token = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIiwidHlwIjoiYXQrand0In0.e30.c2ln"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CountEvents(
            gateway_pb2.CountEventsRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details().startswith("auth is unavailable")
    await asyncio.sleep(0.1)
    assert audit.sent + audit.dropped == 0
