"""Health that reflects dependencies: a watcher per service probes its Postgres and Redis.

A replica whose database or queue is out of reach cannot do its work; if its health still said
SERVING, health-checked round_robin clients would keep sending it calls that fail (or wait out
their retries). So each service's server runs a `DependencyWatcher`: every `interval` seconds it
runs one cheap probe per dependency (`SELECT 1`, `PING`) with a short timeout, over a connection
of its own (a pool busy with real work must not make the replica look down, and a probe must
not take a connection the work needs). When any probe fails, every service the server hosts
(and the overall "" entry) becomes NOT_SERVING; once all pass again, SERVING. A replica that is
draining stays NOT_SERVING: the health servicer ignores `set` after `enter_graceful_shutdown`.

What each service does while NOT_SERVING is its own (see README, "Replicas and health"): the
watcher only reports, it stops nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy.engine import make_url

from streammesh.mesh.startup import redact_url
from streammesh.mesh.tasks import raise_if_cancelled, stop_task

__all__ = ["DependencyCheck", "DependencyWatcher", "postgres_check", "redis_check"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DependencyCheck:
    """One dependency of a service and how to probe it."""

    name: str
    """What the logs call it, with a redacted URL: "Postgres at postgresql://..."."""
    probe: Callable[[float], Awaitable[None]]
    """Raises (anything) when the dependency does not answer within the given seconds."""
    close: Callable[[], Awaitable[None]]
    """Releases the probe's own connection."""


def postgres_check(database_url: str) -> DependencyCheck:
    """`SELECT 1` over one connection of the check's own, opened on demand, opened anew when
    the server closed it (an idle timeout, a restart) and dropped after any failure, so that a
    Postgres that came back is seen at once."""
    url = make_url(database_url)
    held: list[asyncpg.Connection] = []

    async def drop() -> None:
        while held:
            connection = held.pop()
            with contextlib.suppress(Exception):  # already broken: nothing left to release
                connection.terminate()

    async def probe(timeout: float) -> None:
        try:
            if held and held[0].is_closed():
                await drop()
            if not held:
                held.append(
                    await asyncpg.connect(
                        host=url.host or "127.0.0.1",
                        port=url.port or 5432,
                        user=url.username or "postgres",
                        password=url.password,
                        database=url.database,
                        timeout=timeout,
                        server_settings={"application_name": "streammesh-health"},
                    )
                )
            await held[0].fetchval("SELECT 1", timeout=timeout)
        except BaseException:
            await drop()
            raise

    return DependencyCheck(f"Postgres at {redact_url(database_url)}", probe, drop)


def redis_check(redis_url: str) -> DependencyCheck:
    """`PING` over a client of the check's own, made at the first probe with socket timeouts
    as short as the probe's and one immediate retry (a pooled connection the server closed is
    replaced at once; the next round is the retry of anything else)."""
    held: list[aioredis.Redis] = []

    async def probe(timeout: float) -> None:
        if not held:
            held.append(
                aioredis.Redis.from_url(
                    redis_url,
                    socket_connect_timeout=timeout,
                    socket_timeout=timeout,
                    retry=Retry(NoBackoff(), 1),
                )
            )
        await held[0].ping()

    async def close() -> None:
        while held:
            await held.pop().aclose()

    return DependencyCheck(f"Redis at {redact_url(redis_url)}", probe, close)


class DependencyWatcher:
    """Sets `services` (and "") NOT_SERVING while any check fails, SERVING once all pass."""

    def __init__(
        self,
        servicer: health.aio.HealthServicer,
        services: Sequence[str],
        checks: Sequence[DependencyCheck],
        *,
        interval: float = 1.0,
        timeout: float = 1.0,
    ) -> None:
        self._health = servicer
        self._services = ("", *services)
        self._checks = tuple(checks)
        self._interval = interval
        self._timeout = timeout
        self._failing: dict[str, str] = {}
        self._published: bool | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def failing(self) -> dict[str, str]:
        """Dependency -> why its last probe failed; empty while all answer."""
        return dict(self._failing)

    def start(self) -> None:
        """Probe in the background until `stop`."""
        if self._task is None and self._checks:
            self._task = asyncio.create_task(self._run(), name="dependency-watcher")

    async def stop(self) -> None:
        """End the probes and close their connections."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        for check in self._checks:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                await check.close()

    async def check_once(self) -> bool:
        """Run every probe once and publish the outcome; True when all answered."""
        results = await asyncio.gather(*(self._probe(check) for check in self._checks))
        failing = {check.name: why for check, why in zip(self._checks, results, strict=True) if why}
        for name, why in failing.items():
            if name not in self._failing:
                log.warning("%s unreachable (%s): reporting NOT_SERVING", name, why)
        for name in self._failing.keys() - failing.keys():
            log.info("%s answers again", name)
        self._failing = failing
        healthy = not failing
        if healthy != self._published:
            self._published = healthy
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if healthy
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in self._services:
                await self._health.set(service, status)
        return healthy

    async def _probe(self, check: DependencyCheck) -> str:
        """ "" when the dependency answered in time, else why not (one line)."""
        try:
            async with asyncio.timeout(self._timeout):
                await check.probe(self._timeout)
        except TimeoutError:
            return f"no answer within {self._timeout:g}s"
        except Exception as error:  # any failure of the probe means the same: unreachable
            return " ".join(str(error).split()) or type(error).__name__
        return ""

    async def _run(self) -> None:
        while True:
            raise_if_cancelled()
            await self.check_once()
            await asyncio.sleep(self._interval)
