"""The compose stack as containers: built, brought up, used and taken down on this machine.

What runs: scripts/ensure-docker.sh (an engine, started here if none answers), then
scripts/compose-offline.sh build (the debootstrap base image, the wheelhouse, the StreamMesh image;
the first two are cached) and compose with compose/host-network.override.yml, on free loopback
ports and under a project name of its own, so it runs beside a user's stack or `streammesh up`.
It checks that each service container holds only the CA certificate and its own key, creates an
admin from a `compose run` of the `pki` job (the one container with the operator key). From the
host, through the gateway's port and with the PKI the compose `pki` job made, it runs the
demo flow, checks the stored counts in the containers' PostgreSQL, SIGKILLs the processor under
load and checks that every acknowledged event is stored exactly once, then removes the
containers, volumes and the image it built, and stops the engine if it started it.

Skipped, with the reason, only where no engine can run at all (not root, no engine answering).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyotp
import pytest

from streammesh.api.common.v1 import event_pb2
from streammesh.cli.admin import create_user_as_operator
from streammesh.cli.demo import run_demo
from streammesh.cli.stack import StackConfig, free_ports
from streammesh.client import GatewayClient

ROOT = Path(__file__).resolve().parents[2]
ENSURE_DOCKER = ROOT / "scripts" / "ensure-docker.sh"
COMPOSE_OFFLINE = ROOT / "scripts" / "compose-offline.sh"
PORTS = ("GATEWAY", "AUTH", "INGEST", "PROCESSOR", "STORAGE", "POSTGRES", "REDIS")
SERVICES = ("gateway", "auth", "ingest", "processor", "storage")
PSQL = "/usr/lib/postgresql/15/bin/psql"

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class ComposeStack:
    """A running compose project: how to reach it and how to run compose against it."""

    env: dict[str, str]
    ports: dict[str, int]
    state_dir: Path

    def compose(self, *args: str, timeout: float = 300, stdin: str = "") -> str:
        result = subprocess.run(
            [str(COMPOSE_OFFLINE), "compose", *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def sql(self, query: str, **variables: str) -> list[str]:
        """Rows of `query` from the containers' PostgreSQL (psql over its local socket); the
        query reads `variables` as :'name' (psql quotes them)."""
        settings = [f"--set={name}={value}" for name, value in variables.items()]
        psql = [PSQL, "-U", "postgres", "-d", "streammesh", "-XAt", "-v", "ON_ERROR_STOP=1"]
        out = self.compose("exec", "-T", "postgres", *psql, *settings, stdin=query)
        return out.splitlines()

    def config(self) -> StackConfig:
        """What the host-side clients use: the copied PKI and the host-network ports."""
        return StackConfig(
            state_dir=self.state_dir,
            gateway_port=self.ports["GATEWAY"],
            auth_port=self.ports["AUTH"],
        )


def _run(
    *args: str | Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _ensure_engine() -> bool:
    """True if this fixture started the engine (and so must stop it)."""
    check = _run(ENSURE_DOCKER, "check", timeout=60)
    if check.returncode == 2:
        pytest.skip(f"no Docker engine can run here: {check.stdout.strip()}")
    start = _run(ENSURE_DOCKER, "start", timeout=600)
    assert start.returncode == 0, f"could not start a Docker engine:\n{start.stderr}"
    return start.stdout.strip().splitlines()[-1] == "started"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    started_engine = _ensure_engine()
    run = uuid.uuid4().hex[:8]
    ports = dict(zip(PORTS, free_ports("127.0.0.1", len(PORTS)), strict=True))
    env = {
        "COMPOSE_PROJECT_NAME": f"smtest-{run}",
        "STREAMMESH_COMPOSE_IMAGE": f"streammesh:smtest-{run}",
    } | {f"STREAMMESH_COMPOSE_{name}_PORT": str(port) for name, port in ports.items()}
    stack = ComposeStack(env=env, ports=ports, state_dir=tmp_path_factory.mktemp("compose"))
    try:
        built = subprocess.run(
            [str(COMPOSE_OFFLINE), "build"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert built.returncode == 0, f"build failed:\n{built.stdout}{built.stderr}"
        stack.compose("up", "-d", "--wait", "--no-build", timeout=300)
        # The CA certificate and the operator's certificate, as an operator would take them.
        stack.compose("cp", "pki:/state/pki", str(stack.state_dir / "pki"))
        yield stack
    except BaseException:
        # This run's project and ports (env), not the default project's.
        logs = _run(
            COMPOSE_OFFLINE, "compose", "logs", "--no-color", "--tail", "40", timeout=60, env=env
        )
        print(logs.stdout, logs.stderr)
        raise
    finally:
        subprocess.run(
            [str(COMPOSE_OFFLINE), "compose", "down", "-v", "--timeout", "20"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            timeout=300,
            check=False,
        )
        _run("docker", "image", "rm", "--force", env["STREAMMESH_COMPOSE_IMAGE"], timeout=120)
        if started_engine:
            _run(ENSURE_DOCKER, "stop", timeout=120)


def _stored(stack: ComposeStack, event_type: str) -> tuple[int, int]:
    """(rows, distinct ids) stored for `event_type`, counted in PostgreSQL itself."""
    rows, distinct = stack.sql(
        "SELECT count(*), count(DISTINCT id) FROM storage.events WHERE type = :'type'",
        type=event_type,
    )[0].split("|")
    return int(rows), int(distinct)


async def test_demo_flow_through_the_published_gateway(stack: ComposeStack) -> None:
    config = stack.config()
    async with GatewayClient(config.address("gateway"), config.pki_dir / "ca.pem") as client:
        report = await run_demo(
            client,
            create_user=partial(create_user_as_operator, config),
            events=3000,
            batch_size=300,
            say=lambda line: None,
        )
    assert report.order_kept
    assert report.keys == 16
    event_type = "demo." + report.username.removeprefix("demo-")
    assert _stored(stack, event_type) == (3000, 3000)


def test_service_containers_hold_only_their_own_key(stack: ComposeStack) -> None:
    """A compromised service must not act as the operator (whose certificate may CreateUser on
    auth) nor as another service: its container holds the CA certificate and its own key only."""
    for name in SERVICES:
        found = stack.compose("exec", "-T", name, "find", "/state", "-name", "*.pem").split()
        own = {f"/state/tls/{name}/{file}" for file in ("ca.pem", f"{name}.pem", f"{name}-key.pem")}
        assert set(found) == own, name
    # The operator's copy (the fixture's `compose cp`) has the CA and operator certificates.
    assert {"ca.pem", "admin.pem", "admin-key.pem"} <= {
        path.name for path in (stack.state_dir / "pki").iterdir()
    }


def test_operator_bootstraps_from_a_run_of_the_pki_job(stack: ComposeStack) -> None:
    """The README's break-glass path where auth is not published: `compose run` of the `pki`
    service, the only one with the operator key (host networking here, so the port is set)."""
    username = f"root-{uuid.uuid4().hex[:8]}"
    out = stack.compose(
        *("run", "--rm", "-T", "-e", f"STREAMMESH_AUTH_PORT={stack.ports['AUTH']}", "pki"),
        *("streammesh", "admin", "bootstrap", username, "--password-stdin"),
        stdin=uuid.uuid4().hex + "\n",
    )
    assert f"created admin {username}" in out
    roles = stack.sql("SELECT roles FROM auth.users WHERE username = :'name'", name=username)
    assert roles == ["{admin}"]


async def _producer(config: StackConfig, client: GatewayClient) -> None:
    """Log `client` in as a new producer + analyst (operator path, TOTP enrolment)."""
    username, password = f"load-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    await create_user_as_operator(config, username, password, ["producer", "analyst"])
    totp = pyotp.TOTP((await client.begin_totp(username, password)).secret)
    await client.confirm_totp(username, password, totp.now())
    challenge = await client.start_login(username, password)
    await client.complete_login(challenge, totp_code=totp.at(time.time() + 30))


def _state(container: str) -> dict[str, Any]:
    """The engine's State of a container (Status, StartedAt, ...)."""
    inspected = json.loads(_run("docker", "inspect", container, timeout=60).stdout)
    state: dict[str, Any] = inspected[0]["State"]
    return state


async def test_processor_killed_under_load_loses_no_acknowledged_event(
    stack: ComposeStack,
) -> None:
    """The processor holds read but unacknowledged entries; SIGKILL is where loss would show.

    Publishing goes on while it is down (ingest acknowledges once Redis has the events); the
    restarted container takes the partitions over when the dead one's leases expire and finishes
    its pending entries. Every acknowledged id must be stored, and each once.
    """
    config = stack.config()
    event_type = f"compose.kill.{uuid.uuid4().hex[:8]}"
    acked: set[str] = set()
    stop = asyncio.Event()

    async with GatewayClient(config.address("gateway"), config.pki_dir / "ca.pem") as client:
        await _producer(config, client)

        async def publish() -> None:
            for number in range(3000):  # bounded: about 5 minutes at the pace below
                if stop.is_set():
                    return
                batch = [
                    event_pb2.Event(
                        id=str(uuid.uuid4()), key=f"k-{i % 8}", type=event_type, payload=b"{}"
                    )
                    for i in range(100)
                ]
                reply = await client.publish_batch(batch)
                assert reply.accepted == len(batch), f"batch {number}: {reply}"
                acked.update(event.id for event in batch)
                await asyncio.sleep(0.1)

        publisher = asyncio.create_task(publish())

        async def acked_at_least(count: int) -> None:
            async with asyncio.timeout(120):
                while len(acked) < count:
                    if publisher.done():
                        publisher.result()  # raises what stopped it
                        raise AssertionError(f"publishing ended at {len(acked)} events")
                    await asyncio.sleep(0.1)

        try:
            await acked_at_least(2000)
            container = stack.compose("ps", "-q", "processor").strip()
            before = _state(container)["StartedAt"]
            await asyncio.to_thread(stack.compose, "kill", "-s", "SIGKILL", "processor")
            at_kill = len(acked)
            await acked_at_least(at_kill + 2000)  # the queue takes events with no processor
            # The engine does not restart a container it was told to kill; nothing stores now,
            # so what is stored is at most what had been acknowledged when it died.
            assert _state(container)["Status"] == "exited"
            stored_while_down = (await asyncio.to_thread(_stored, stack, event_type))[1]
            assert stored_while_down <= at_kill < len(acked)
            await asyncio.to_thread(
                stack.compose, "up", "-d", "--wait", "--no-build", "--no-deps", "processor"
            )
            restarted = _state(container)
            assert restarted["Status"] == "running" and restarted["StartedAt"] != before
            await acked_at_least(len(acked) + 2000)
        finally:
            stop.set()
            await publisher

    expected = len(acked)
    async with asyncio.timeout(180):
        while (stored := await asyncio.to_thread(_stored, stack, event_type))[1] < expected:
            await asyncio.sleep(1)
    assert stored == (expected, expected)
    ids = set(stack.sql("SELECT id FROM storage.events WHERE type = :'type'", type=event_type))
    assert ids == acked
