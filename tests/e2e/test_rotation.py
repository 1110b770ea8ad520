"""Certificate rotation of the running stack (the `stack` fixture), under load through the gateway:
steady unary calls (PublishBatch, CountEvents) and one Publish stream, while `streammesh pki
rotate` (the CLI's entry point, run in this process) re-issues every leaf, then `pki rotate --ca` and `--ca --finish` replace the CA with an
overlap. No call fails, every acknowledged event is stored once, every service presents its new
certificate to a new connection, and a leaf that expired or chains to the dropped CA is refused.

The stack's services check their files every 0.5 s (tests/e2e/conftest.py). Every loop is
bounded in calls and seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streammesh.api.common.v1 import event_pb2
from streammesh.cli.main import main
from streammesh.cli.stack import START_ORDER, StackConfig, log_file
from streammesh.client import GatewayClient
from streammesh.mesh import TlsMaterial, create_channel, service_config
from streammesh.mesh.identity import operator_id
from streammesh.mesh.pki import CA_FILE
from tests.certificates import odd_leaf, served_certificate
from tests.e2e.cli import stack_env
from tests.e2e.session import login

pytestmark = pytest.mark.slow


@dataclass
class Load:
    """What the load sent and what was acknowledged."""

    event_type: str
    acked: set[str] = field(default_factory=set)
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def events(self, count: int) -> list[event_pb2.Event]:
        return [
            event_pb2.Event(
                id=str(uuid.uuid4()), key=f"k{n % 4}", type=self.event_type, payload=b"{}"
            )
            for n in range(count)
        ]

    async def unary(self, client: GatewayClient, limit: int) -> None:
        event_filter = event_pb2.EventFilter(type=self.event_type)
        for _ in range(limit):
            if self.done.is_set():
                return
            batch = self.events(2)
            try:
                await client.publish_batch(batch)
                self.acked.update(event.id for event in batch)
                await client.count(event_filter)
                self.ok += 2
            except grpc.aio.AioRpcError as error:
                self.failed.append(f"unary {error.code().name}: {error.details()}")
            await asyncio.sleep(0.01)

    async def stream(self, client: GatewayClient, limit: int) -> None:
        sent: list[list[event_pb2.Event]] = []

        async def batches() -> AsyncIterator[list[event_pb2.Event]]:
            for _ in range(limit):
                if self.done.is_set():
                    return
                sent.append(self.events(5))
                yield sent[-1]
                await asyncio.sleep(0.02)

        try:
            async for ack in client.publish(batches(), timeout=110):
                self.acked.update(event.id for event in sent[ack.sequence - 1])
                self.ok += 1
        except grpc.aio.AioRpcError as error:
            self.failed.append(f"stream {error.code().name}: {error.details()}")


def serial_of(stack: StackConfig, name: str) -> int:
    return x509.load_pem_x509_certificate(
        (stack.pki_dir / f"{name}.pem").read_bytes()
    ).serial_number


async def presented(stack: StackConfig, name: str) -> x509.Certificate:
    """The certificate service `name` presents to a new connection (as the admin)."""
    pki = stack.pki_dir
    return await served_certificate(
        stack.port(name),
        pki / CA_FILE,
        server_name=name,
        client=(pki / "admin.pem", pki / "admin-key.pem"),
    )


async def health_with(stack: StackConfig, name: str, material: TlsMaterial) -> None:
    """A health check of `name` over a new connection presenting `material`."""
    channel = create_channel(
        stack.address(name),
        material,
        server_name=name,
        config=service_config("grpc.health.v1.Health", health_checked=False),
    )
    async with channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def until(condition: Callable[[], Awaitable[bool]], what: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.2)


async def pki_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    """`streammesh pki <args>` in this process (in a thread: it sleeps through its waits), as
    the CLI's entry point runs it; its output. A subprocess would cost seconds to start."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["pki", *args])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    return out


async def test_rotation_under_load_fails_no_call_and_loses_no_event(
    stack: StackConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable, value in stack_env(stack).items():
        if variable.startswith("STREAMMESH_"):
            monkeypatch.setenv(variable, value)
    old_material = TlsMaterial.load(stack.pki_dir, "admin")
    async with GatewayClient(stack.address("gateway"), stack.pki_dir / CA_FILE) as client:
        await login(client, stack)
        load = Load(f"rotation.{uuid.uuid4().hex[:8]}")
        event_filter = event_pb2.EventFilter(type=load.event_type)

        async def answers() -> bool:
            # A stack just brought up: the gateway's channels may still be backing off from
            # a storage that started after them.
            batch = load.events(1)
            try:
                await client.publish_batch(batch)
                load.acked.update(event.id for event in batch)
                await client.count(event_filter)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False
            return True

        await until(answers, "the gateway to reach ingest and storage", within=30)
        tasks = [
            asyncio.create_task(load.unary(client, limit=3000)),
            asyncio.create_task(load.stream(client, limit=3000)),
        ]
        try:
            await asyncio.sleep(1)
            assert load.ok > 0 and load.failed == []
            # 1. Every leaf, while the load runs.
            before = {name: serial_of(stack, name) for name in START_ORDER}
            out = await pki_command(monkeypatch, capsys, "rotate")
            assert {line.split(":")[0] for line in out.splitlines()} >= {
                f"{name}.pem" for name in (*START_ORDER, "admin")
            }
            for name in START_ORDER:
                assert serial_of(stack, name) != before[name]
                cert = await presented(stack, name)
                assert cert.serial_number == serial_of(stack, name), name
                lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
                assert lifetime == dt.timedelta(seconds=3600, minutes=5)  # with its backdating
            await asyncio.sleep(1.5)  # every mesh client swaps within 0.5 s and a connect
            # 2. A new CA, trusted beside the old one; every leaf issued under it.
            old_ca = x509.load_pem_x509_certificates((stack.pki_dir / CA_FILE).read_bytes())
            out = await pki_command(monkeypatch, capsys, "rotate", "--ca", "--wait", "2")
            assert "streammesh pki rotate --ca --finish" in out
            bundle = x509.load_pem_x509_certificates((stack.pki_dir / CA_FILE).read_bytes())
            assert len(bundle) == 2 and bundle[0] == old_ca[0]
            for name in START_ORDER:
                (await presented(stack, name)).verify_directly_issued_by(bundle[1])
            # 3. The old CA dropped, once every service had its new leaf.
            out = await pki_command(
                monkeypatch, capsys, "rotate", "--ca", "--finish", "--wait", "2"
            )
            assert "now holds only the new CA" in out
            assert x509.load_pem_x509_certificates((stack.pki_dir / CA_FILE).read_bytes()) == [
                bundle[1]
            ]
            mark = load.ok
            await asyncio.sleep(1.5)
            assert load.ok > mark
        finally:
            load.done.set()
            await asyncio.gather(*tasks)
        assert load.failed == [], load.failed[:3]
        assert client.recycled_streams == 0

        async def all_stored() -> bool:
            return await client.count(event_filter) >= len(load.acked)

        await until(all_stored, f"{len(load.acked)} acknowledged events stored", within=30)
        assert await client.count(event_filter) == len(load.acked)
        stored = {e.event.id async for e in client.query_all(event_filter)}
        assert stored == load.acked

    # A leaf of the dropped CA, and an expired leaf of the new one, are refused at the handshake.
    admin = operator_id(stack.trust_domain, "admin")
    expired = odd_leaf(stack.pki_dir, [admin], valid_from=dt.timedelta(hours=-2))
    for material in (old_material, expired):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_with(stack, "storage", material)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await health_with(stack, "storage", TlsMaterial.load(stack.pki_dir, "admin"))  # control
    # No service met material it could not use.
    for name in START_ORDER:
        log = log_file(stack, name).read_text()
        assert "not reloaded" not in log and "did not connect" not in log, name
