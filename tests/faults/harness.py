"""The fault tests' stack: real service processes started by the CLI's own code on free loopback
ports, on the tests' own Redis and PostgreSQL when they are installed, with short lease timings.

`FaultStack` restarts, kills, stops and resumes single services by PID (through
`streammesh.cli.stack`), logs a user in, and `heal()`s the stack between tests: every service
back with its default settings, extra instances stopped, nothing left SIGSTOPped.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pyotp

from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc
from streammesh.cli.admin import create_user_as_operator
from streammesh.cli.stack import (
    START_ORDER,
    ServiceState,
    StackConfig,
    check_health,
    running_pid,
    signal_service,
    start_service,
    stop_service,
)
from streammesh.client import GatewayClient
from streammesh.mesh import TlsMaterial, create_channel
from streammesh.streams import StreamLayout
from tests.faults.backends import PostgresCluster, RedisServer
from tests.faults.load import LoadGenerator, Metadata, keys_over_partitions

__all__ = ["TUNING", "FaultStack"]

TUNING: dict[str, dict[str, str]] = {
    "processor": {
        # A crashed processor's partitions move after 1.5 s instead of 10 s.
        "STREAMMESH_PROCESSOR_LEASE_TTL_MS": "1500",
        "STREAMMESH_PROCESSOR_HEARTBEAT_MS": "300",
        "STREAMMESH_PROCESSOR_CLAIM_IDLE_MS": "1000",
        "STREAMMESH_PROCESSOR_RETRY_BACKOFF_SECONDS": "0.2",
        "STREAMMESH_PROCESSOR_BLOCK_MS": "200",
        "STREAMMESH_PROCESSOR_TRIM_INTERVAL_SECONDS": "1",
        "STREAMMESH_PROCESSOR_STORE_TIMEOUT_SECONDS": "5",
    },
    "ingest": {
        "STREAMMESH_INGEST_PRESSURE_SAMPLE_MS": "50",
        "STREAMMESH_INGEST_RETRY_AFTER_SECONDS": "0.2",
    },
}
"""Extra environment every start of these services gets (a test may add to it)."""


@dataclass
class FaultStack:
    config: StackConfig
    redis: RedisServer | None
    """The tests' own redis-server, or None when the stack uses a shared Redis."""
    postgres: PostgresCluster | None
    """The tests' own PostgreSQL cluster, or None when the stack uses a shared one."""
    customized: set[str] = field(default_factory=set)
    instances: set[tuple[str, str]] = field(default_factory=set)

    @property
    def layout(self) -> StreamLayout:
        return StreamLayout(prefix=self.config.stream_prefix, partitions=self.config.partitions)

    def log_file(self, name: str) -> Path:
        return self.config.state_dir / "logs" / f"{name}.log"

    def pid(self, name: str, *, instance: str | None = None) -> int | None:
        return running_pid(self.config, name, instance=instance)

    async def start(
        self,
        name: str,
        extra_env: dict[str, str] | None = None,
        *,
        instance: str | None = None,
    ) -> ServiceState:
        """Start `name` (or an extra instance of it) with the tuning plus `extra_env`."""
        env = {**TUNING.get(name, {}), **(extra_env or {})}
        if instance is not None:
            self.instances.add((name, instance))
        elif extra_env:
            self.customized.add(name)
        else:
            self.customized.discard(name)
        return await start_service(self.config, name, extra_env=env, instance=instance)

    def stop(self, name: str, *, instance: str | None = None, grace: float = 15.0) -> str:
        """SIGTERM (graceful drain) and wait; SIGKILL after `grace`."""
        return stop_service(self.config, name, instance=instance, grace=grace)

    async def restart(self, name: str, extra_env: dict[str, str] | None = None) -> ServiceState:
        self.stop(name)
        return await self.start(name, extra_env)

    def signal(self, name: str, sig: signal.Signals, *, instance: str | None = None) -> int:
        pid = signal_service(self.config, name, sig, instance=instance)
        assert pid is not None, f"{name} is not running"
        return pid

    async def wait_exit(self, name: str, timeout: float, *, instance: str | None = None) -> bool:
        """True once the service's process is gone (reaped), False if it still runs."""
        deadline = time.monotonic() + timeout
        while self.pid(name, instance=instance) is not None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def heal(self) -> None:
        """Back to the default stack: resume anything stopped, stop extra instances, make sure
        Redis and PostgreSQL run, restart services that died or run with a test's settings."""
        for name in START_ORDER:
            signal_service(self.config, name, signal.SIGCONT)
        for name, instance in sorted(self.instances):
            self.stop(name, instance=instance, grace=5.0)
        self.instances.clear()
        if self.redis is not None and not self.redis.running():
            self.redis.start()
        if self.postgres is not None and not self.postgres.running():
            self.postgres.start()
        for name in START_ORDER:
            if name in self.customized:
                await self.restart(name)
            elif self.pid(name) is None or await check_health(self.config, name) != "SERVING":
                self.stop(name, grace=5.0)
                await self.start(name)

    async def login(self, roles: tuple[str, ...] = ("producer", "analyst")) -> Metadata:
        """A new user with `roles`, made through the operator path, TOTP enrolled, logged in;
        returns the bearer metadata. After a Redis restart auth fails one call per stale
        pooled Redis connection (UNAVAILABLE), so the flow is retried with a new user."""
        for attempt in range(1, 4):
            try:
                return await self._login(roles)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 3:
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def _login(self, roles: tuple[str, ...]) -> Metadata:
        username, password = f"fault-{uuid.uuid4().hex[:8]}", "correct horse battery staple"
        await create_user_as_operator(self.config, username, password, list(roles))
        async with GatewayClient(
            self.config.address("gateway"), self.config.pki_dir / "ca.pem"
        ) as client:
            totp = pyotp.TOTP((await client.begin_totp(username, password)).secret)
            await client.confirm_totp(username, password, totp.now())
            # The confirming code is spent; the next step's code is within the allowed drift.
            await client.login(username, password, totp.at(time.time() + 30))
            return client.bearer()

    def load(self, metadata: Metadata, *, producers: int = 2, **options: Any) -> LoadGenerator:
        """A load generator with a fresh run id and two keys per partition per producer."""
        run = uuid.uuid4().hex[:10]
        return LoadGenerator(
            self.config.address("gateway"),
            self.config.pki_dir / "ca.pem",
            metadata,
            run=run,
            keys=keys_over_partitions(run, self.layout, 2 * producers),
            producers=producers,
            **options,
        )

    async def processor_status(self, address: str | None = None) -> processor_pb2.GetStatusResponse:
        """ProcessorService.GetStatus with the operator certificate."""
        channel = create_channel(
            address or self.config.address("processor"),
            TlsMaterial.load(self.config.pki_dir, "admin"),
            server_name="processor",
            config={"methodConfig": []},
        )
        async with channel:
            reply: processor_pb2.GetStatusResponse = await processor_pb2_grpc.ProcessorServiceStub(
                channel
            ).GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
        return reply
