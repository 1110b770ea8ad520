"""Replicas as real processes: health-checked round_robin over two storage replicas, one of which
loses its Postgres (through a TCP proxy the test cuts; the shared server is untouched) or is
SIGTERMed under load; ingest, processor and auth processes whose Redis goes away (NOT_SERVING,
then SERVING, in the same process); and `streammesh up --replicas` / `status` / `down` from the
command line.

Every loop is bounded in calls and seconds; only processes started here are stopped.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import make_url

from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.cli.stack import (
    ServiceState,
    StackConfig,
    check_health,
    prepare_state,
    process_alive,
    recorded_pid,
    running_pid,
    shut_down,
    signal_service,
    start_service,
)
from streammesh.mesh import TlsMaterial, create_channel, service_config
from streammesh.mesh.postgres import ensure_database
from tests.e2e.cli import drop_test_data, run_cli, stack_env
from tests.e2e.conftest import new_stack_config
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

SERVICE = "streammesh.storage.v1.StorageService"
FAST_HEALTH = {
    "STREAMMESH_STORAGE_HEALTH_INTERVAL_SECONDS": "0.2",
    "STREAMMESH_STORAGE_HEALTH_TIMEOUT_SECONDS": "0.5",
    "STREAMMESH_STORAGE_LOG_JSON": "false",
    "STREAMMESH_STORAGE_LOG_LEVEL": "INFO",
}


@dataclass
class Replicas:
    config: StackConfig
    states: dict[str, ServiceState]
    """Instance ("a", "b") -> its process."""
    proxies: dict[str, TcpProxy]
    """Instance -> the proxy its Postgres connections go through."""

    @property
    def target(self) -> str:
        return ",".join(state.address for state in self.states.values())

    async def health(self, instance: str) -> str:
        return await check_health(self.config, "storage", address=self.states[instance].address)

    async def wait_health(self, instance: str, wanted: str, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while (status := await self.health(instance)) != wanted:
            assert time.monotonic() < deadline, f"storage@{instance} still {status}"
            await asyncio.sleep(0.1)


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Replicas]:
    """Two storage processes on one schema, each reaching Postgres through its own proxy."""
    config = new_stack_config(tmp_path / "state")
    prepare_state(config)
    await ensure_database(config.database_url)
    database = make_url(config.database_url)
    proxies: dict[str, TcpProxy] = {}
    states: dict[str, ServiceState] = {}
    try:
        for instance in ("a", "b"):
            proxy = TcpProxy(database.host or "127.0.0.1", database.port or 5432)
            await proxy.start()
            proxies[instance] = proxy
            url = database.set(port=proxy.port).render_as_string(hide_password=False)
            env = FAST_HEALTH | {"STREAMMESH_STORAGE_DATABASE_URL": url}
            states[instance] = await start_service(
                config, "storage", instance=instance, extra_env=env
            )
        yield Replicas(config, states, proxies)
    finally:
        # Off the loop: the proxies run on it, and storage closes its pool through them.
        outcome = await asyncio.to_thread(shut_down, config, names=["storage"], grace=10)
        assert "killed" not in outcome.values(), outcome
        for proxy in proxies.values():
            await proxy.close()
        await drop_test_data(config)


def _stub(
    replicas: Replicas, *, retries: bool
) -> tuple[grpc.aio.Channel, storage_pb2_grpc.StorageServiceStub]:
    """A round_robin, health-checked channel over both replicas, as the gateway builds one;
    CountEvents retried on UNAVAILABLE when `retries`."""
    channel = create_channel(
        replicas.target,
        TlsMaterial.load(replicas.config.pki_dir, "gateway"),
        server_name="storage",
        config=service_config(
            SERVICE,
            retry_methods=["CountEvents"] if retries else [],
            unary_methods=["CountEvents"],
            timeout_seconds=5,
        ),
    )
    return channel, storage_pb2_grpc.StorageServiceStub(channel)


@dataclass
class Outcomes:
    ok: int = 0
    failed: list[str] = field(default_factory=list)


async def _calls(stub: storage_pb2_grpc.StorageServiceStub, count: int, outcomes: Outcomes) -> None:
    for _ in range(count):
        try:
            await stub.CountEvents(storage_pb2.CountEventsRequest(), wait_for_ready=True)
            outcomes.ok += 1
        except grpc.aio.AioRpcError as error:
            outcomes.failed.append(f"{error.code().name}: {error.details()}")


async def _calls_until(
    stub: storage_pb2_grpc.StorageServiceStub, done: asyncio.Event, outcomes: Outcomes, limit: int
) -> None:
    """Calls one after another until `done` (at most `limit`)."""
    for _ in range(limit):
        if done.is_set():
            return
        await _calls(stub, 1, outcomes)


async def test_replica_without_postgres_is_skipped_and_rejoins(replicas: Replicas) -> None:
    retrying_channel, retrying = _stub(replicas, retries=True)
    plain_channel, plain = _stub(replicas, retries=False)
    try:
        warm = Outcomes()
        await _calls(plain, 20, warm)
        assert warm.failed == [] and warm.ok == 20
        for lost, kept in (("a", "b"), ("b", "a")):
            # Calls go on while the replica loses Postgres; the retried ones never fail, even
            # in the moment before its health says so (UNAVAILABLE is retried on the other).
            during = Outcomes()
            done = asyncio.Event()
            loop = asyncio.create_task(_calls_until(retrying, done, during, limit=5000))
            await replicas.proxies[lost].cut()
            await replicas.wait_health(lost, "NOT_SERVING", within=10)
            assert await replicas.health(kept) == "SERVING"
            await asyncio.sleep(0.5)  # the channels' health watch streams deliver the change
            done.set()
            await loop
            assert during.failed == [] and during.ok > 0
            # Without retries too: a call that reached the replica without Postgres would
            # fail, so 40 successes mean round_robin sent none there.
            skipped = Outcomes()
            await _calls(plain, 40, skipped)
            assert skipped.failed == [], skipped.failed[:3]
            await replicas.proxies[lost].restore()
            await replicas.wait_health(lost, "SERVING", within=10)
            await asyncio.sleep(0.5)
        # Each replica was the only one serving once; the second round needed "a" back.
        assert all(running_pid(replicas.config, "storage", instance=i) for i in ("a", "b"))
    finally:
        await retrying_channel.close()
        await plain_channel.close()


@pytest.mark.parametrize("retries", [True, False], ids=["retried", "not-retried"])
async def test_sigterm_drains_one_replica_without_a_failed_call(
    replicas: Replicas, retries: bool
) -> None:
    """SIGTERM: NOT_SERVING, the drain delay, then the graceful stop. Callers move to the
    other replica within the delay, so even calls that are not retried do not fail."""
    channel, stub = _stub(replicas, retries=retries)
    try:
        outcomes = Outcomes()
        done = asyncio.Event()
        workers = [
            asyncio.create_task(_calls_until(stub, done, outcomes, limit=3000)) for _ in range(4)
        ]
        await asyncio.sleep(0.5)
        before = outcomes.ok
        pid = signal_service(replicas.config, "storage", signal.SIGTERM, instance="a")
        assert pid is not None
        deadline = time.monotonic() + 15
        while running_pid(replicas.config, "storage", instance="a") is not None:
            assert time.monotonic() < deadline, "storage@a did not exit after SIGTERM"
            await asyncio.sleep(0.1)
        at_exit = outcomes.ok
        await asyncio.sleep(0.5)
        done.set()
        await asyncio.gather(*workers)
        assert outcomes.failed == [], outcomes.failed[:3]
        assert before > 0 and at_exit > before and outcomes.ok > at_exit
        log = (replicas.config.state_dir / "logs" / "storage@a.log").read_text()
        # The channel's health watch stream was open, so the drain waited its delay.
        watchers = re.search(r"draining: NOT_SERVING \((\d+) health watchers\)", log)
        assert watchers is not None and int(watchers[1]) >= 1, log[-500:]
        assert "stopped" in log
        assert recorded_pid(replicas.config, "storage", instance="a") == pid
    finally:
        await channel.close()


def _environ(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


@pytest.mark.timeout(300)  # eight processes started, two killed and restarted
async def test_up_with_replicas_status_lists_each_then_down(tmp_path: Path) -> None:
    config = new_stack_config(tmp_path / "state")
    env = stack_env(config)
    try:
        code, out, err = await run_cli(
            env, "up", "--replicas", "storage=2,processor=2,gateway=2", "--timeout", "90"
        )
        assert code == 0, err
        code, out, err = await run_cli(env, "status")
        assert code == 0, out + err
        header, *rows, folder = out.splitlines()
        assert header.split() == [
            "replica",
            "pid",
            "port",
            "health",
            "req/s",
            "errors",
            "p99(ms)",
            "parts",
            "lag",
        ]
        assert folder.startswith("state folder:")
        listed = {row.split()[0]: row.split() for row in rows}
        assert set(listed) == {
            "storage",
            "storage@2",
            "auth",
            "ingest",
            "processor",
            "processor@2",
            "gateway",
            "gateway@2",
        }
        assert {row[3] for row in listed.values()} == {"SERVING"}
        ports = {row[2] for row in listed.values()}
        assert len(ports) == len(listed)  # each replica on its own port
        assert listed["storage"][2] == str(config.port("storage"))
        # Every caller of storage was given both storage replicas.
        storage = {f"127.0.0.1:{listed[name][2]}" for name in ("storage", "storage@2")}
        for caller in ("processor", "processor@2", "gateway", "gateway@2", "ingest"):
            variable = f"STREAMMESH_{caller.split('@')[0].upper()}_STORAGE_TARGET"
            target = _environ(int(listed[caller][1]))[variable]
            assert set(target.split(",")) == storage, caller
        # A replica that died is started again by a plain `up`, on the port its callers know.
        crashed = int(listed["storage@2"][1])
        assert signal_service(config, "storage", signal.SIGKILL, instance="2") == crashed
        deadline = time.monotonic() + 10
        while running_pid(config, "storage", instance="2") is not None:
            assert time.monotonic() < deadline, "storage@2 survived SIGKILL"
            await asyncio.sleep(0.1)
        code, out, err = await run_cli(env, "up")
        assert code == 0, err
        again = {line.split()[0]: line.split() for line in out.splitlines()[1:-2]}
        assert again["storage@2"][2] == listed["storage@2"][2]
        assert again["storage@2"][1] != str(crashed) and again["storage@2"][3] == "SERVING"
        listed["storage@2"] = again["storage@2"]
        # The CLI calls every gateway replica: with replica 1 gone, a login still reaches auth
        # through gateway@2 (refused as a failed login, not UNAVAILABLE).
        gone = int(listed["gateway"][1])
        assert signal_service(config, "gateway", signal.SIGKILL) == gone
        deadline = time.monotonic() + 10
        while running_pid(config, "gateway") is not None:
            assert time.monotonic() < deadline, "gateway survived SIGKILL"
            await asyncio.sleep(0.1)
        code, out, err = await run_cli(
            env, "login", "nobody", "--password-stdin", "--code", "000000", stdin="not it"
        )
        assert code == 1 and err.startswith("UNAUTHENTICATED"), err
        code, out, err = await run_cli(env, "up")
        assert code == 0, err
        again = {line.split()[0]: line.split() for line in out.splitlines()[1:-2]}
        listed["gateway"] = again["gateway"]
        # A second `up` with another count is refused while the stack runs.
        code, out, err = await run_cli(env, "up", "--replicas", "storage=3")
        assert code == 1 and "storage runs with 2 replica(s), not 3" in err
        code, out, err = await run_cli(env, "down")
        assert code == 0, err
        assert {line.split()[0] for line in out.splitlines()} == set(listed)
        assert {line.split()[1] for line in out.splitlines()} == {"stopped"}
        pids = [int(row[1]) for row in listed.values()]
        assert [pid for pid in pids if process_alive(pid)] == []
        assert list((config.state_dir / "run").iterdir()) == []
        code, out, err = await run_cli(env, "status")
        assert code == 1 and "storage@2" not in out
    finally:
        shut_down(config)
        await drop_test_data(config)


@pytest.mark.parametrize("name", ["ingest", "processor", "auth"])
async def test_service_without_redis_reports_not_serving_until_it_is_back(
    tmp_path: Path, name: str
) -> None:
    """The wiring of each Redis user's watcher, in its real process."""
    config = new_stack_config(tmp_path / "state")
    prepare_state(config)
    await ensure_database(config.database_url)
    redis = make_url(config.redis_url)
    proxy = TcpProxy(redis.host or "127.0.0.1", redis.port or 6379)
    await proxy.start()
    prefix = f"STREAMMESH_{name.upper()}_"
    env = {
        f"{prefix}REDIS_URL": redis.set(port=proxy.port).render_as_string(hide_password=False),
        f"{prefix}HEALTH_INTERVAL_SECONDS": "0.2",
        f"{prefix}HEALTH_TIMEOUT_SECONDS": "0.5",
    }
    try:
        state = await start_service(config, name, instance="a", extra_env=env)
        for cut, wanted in ((True, "NOT_SERVING"), (False, "SERVING")):
            await (proxy.cut() if cut else proxy.restore())
            deadline = time.monotonic() + 10
            while (health := await check_health(config, name, address=state.address)) != wanted:
                assert time.monotonic() < deadline, f"{name} still {health}"
                await asyncio.sleep(0.1)
        assert running_pid(config, name, instance="a") == state.pid  # it rode the outage out
    finally:
        outcome = await asyncio.to_thread(shut_down, config, names=[name], grace=15)
        assert "killed" not in outcome.values(), outcome
        await proxy.close()
        await drop_test_data(config)
