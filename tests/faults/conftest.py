"""Fixtures of the fault tests: the tests' own Redis and PostgreSQL (when installed), one stack
of real service processes for the whole session, healed back to its defaults around each test,
a Redis client on the stack's Redis, and a logged-in producer.

Everything started here is stopped by PID at the end, and everything created is removed: the
Redis and PostgreSQL directories, or (on shared servers) the schemas and keys of this run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from streammesh.cli.stack import START_ORDER, StackConfig, bring_up, shut_down
from tests.faults.backends import PostgresCluster, RedisServer, find_postgres_bin, free_port
from tests.faults.harness import TUNING, FaultStack
from tests.faults.load import Metadata

PARTITIONS = 4


@pytest.fixture(scope="session")
def own_redis() -> Iterator[RedisServer | None]:
    """A redis-server of our own (AOF, appendfsync always), or None if it is not installed."""
    if shutil.which("redis-server") is None:
        yield None
        return
    directory = Path(tempfile.mkdtemp(prefix="streammesh-faults-redis-"))
    server = RedisServer(directory / "data", fsync="always")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def own_postgres() -> Iterator[PostgresCluster | None]:
    """A PostgreSQL cluster of our own, or None when the server binaries are not installed."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        yield None
        return
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
async def fault_stack(
    tmp_path_factory: pytest.TempPathFactory,
    own_redis: RedisServer | None,
    own_postgres: PostgresCluster | None,
) -> AsyncIterator[FaultStack]:
    run = uuid.uuid4().hex[:10]
    database_url = (
        own_postgres.url("streammesh_faults")
        if own_postgres is not None
        else os.environ.get(
            "STREAMMESH_TEST_DATABASE_URL",
            "postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh_test",
        )
    )
    redis_url = (
        own_redis.url
        if own_redis is not None
        else os.environ.get("STREAMMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    config = StackConfig(
        state_dir=tmp_path_factory.mktemp("faults-stack"),
        database_url=database_url,
        db_schema_prefix=f"t_{run}_",
        redis_url=redis_url,
        stream_prefix=f"smtest:{run}:events",
        auth_redis_prefix=f"smtest:{run}:auth:",
        partitions=PARTITIONS,
        log_level="INFO",
    ).model_copy(update={f"{name}_port": free_port() for name in START_ORDER})
    stack = FaultStack(config, own_redis, own_postgres)
    try:
        await bring_up(config, timeout=90, extra_env=TUNING)
        yield stack
    finally:
        shut_down(config, grace=10)
        if own_postgres is None or own_redis is None:
            await _drop_shared_data(config, own_postgres is None, own_redis is None)


async def _drop_shared_data(config: StackConfig, database: bool, keys: bool) -> None:
    """On shared servers: this run's schemas and Redis keys."""
    if database:
        url = make_url(config.database_url)
        conn = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=url.database
        )
        try:
            for name in ("storage", "auth"):
                await conn.execute(
                    f'DROP SCHEMA IF EXISTS "{config.db_schema_prefix}{name}" CASCADE'
                )
        finally:
            await conn.close()
    if keys:
        client = aioredis.Redis.from_url(config.redis_url)
        try:
            for pattern in (f"{config.stream_prefix}*", f"{config.auth_redis_prefix}*"):
                found = [key async for key in client.scan_iter(match=pattern, count=500)]
                if found:
                    await client.delete(*found)
        finally:
            await client.aclose()


@pytest.fixture
async def stack(fault_stack: FaultStack) -> AsyncIterator[FaultStack]:
    """The session's stack, healed to its defaults before and after the test."""
    await fault_stack.heal()
    try:
        yield fault_stack
    finally:
        await fault_stack.heal()


@pytest.fixture
async def redis_client(stack: FaultStack) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(stack.config.redis_url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def producer(stack: FaultStack) -> Metadata:
    """Bearer metadata of a fresh user with the producer and analyst roles."""
    return await stack.login()
