"""The `event_loop` setting of every service: asyncio's own loop, or uvloop, under the same
mesh server and mTLS channel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streammesh.mesh import (
    ServiceSettings,
    TlsMaterial,
    create_channel,
    create_mesh_server,
    service_config,
)
from streammesh.mesh.startup import event_loop_factory
from tests.conftest import TRUST_DOMAIN


def test_the_setting_picks_the_loop() -> None:
    assert event_loop_factory("asyncio") is None
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert ServiceSettings().event_loop == "asyncio"


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_a_mesh_server_answers_over_mtls_on_either_loop(pki_dir: Path, name: str) -> None:
    settings = ServiceSettings(tls_dir=pki_dir, trust_domain=TRUST_DOMAIN, event_loop=name)

    async def check() -> tuple[type[asyncio.AbstractEventLoop], int]:
        mesh = create_mesh_server(settings, identity="processor", bindings=[], guard=None)
        await mesh.start()
        try:
            async with create_channel(
                f"127.0.0.1:{mesh.port}",
                TlsMaterial.load(pki_dir, "gateway"),
                server_name="processor",
                config=service_config("grpc.health.v1.Health", health_checked=False),
            ) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        finally:
            await mesh.stop(0)
        return type(asyncio.get_running_loop()), reply.status

    # A loop of its own, as run_service makes one (the test runs outside pytest's loop).
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        loop_type, status = runner.run(check())
    assert (loop_type is uvloop.Loop) == (name == "uvloop")
    assert status == health_pb2.HealthCheckResponse.SERVING
