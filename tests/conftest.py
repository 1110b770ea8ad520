"""Shared fixtures: a throw-away PKI, a private Postgres schema and a private Redis key space.

Tests ignore the caller's exported STREAMMESH_* settings (see tests/environment.py) and never
touch a running stack's data: they use the `streammesh_test` database (created on
demand), schemas named `t_<random>` that are dropped afterwards, Redis keys under a random prefix
that are deleted afterwards, and servers bound to port 0.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import asyncpg
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from streammesh.mesh.pki import init_pki
from streammesh.mesh.postgres import ensure_database
from tests.environment import foreign_settings
from tests.watchdog import TaskDumpTimer

TRUST_DOMAIN = "test.streammesh"

StreamEntries = list[tuple[bytes, dict[bytes, bytes]]]
"""An XRANGE reply as the test clients get it: they never set decode_responses, so ids, field
names and values are bytes. (redis-py's annotation covers every client setting: bytes or str,
and None.)"""


async def xrange_entries(client: aioredis.Redis, stream: str) -> StreamEntries:
    """Every entry of `stream`, oldest first (XRANGE - +)."""
    return cast(StreamEntries, await client.xrange(stream))


@pytest.fixture(scope="session", autouse=True)
def _no_exported_settings() -> Iterator[None]:
    """Tests set their own environment: drop every STREAMMESH_* setting the caller exported
    (a developer's stack ports, prefixes, state folder...) for the whole session, before any
    other fixture builds settings. STREAMMESH_TEST_* (the tests' database and Redis) stay."""
    with pytest.MonkeyPatch.context() as patch:
        for name in foreign_settings():
            patch.delenv(name)
        yield


@pytest.fixture(autouse=True)
async def _dump_tasks_before_timeout(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """If this test is about to be failed by pytest-timeout, first print where its tasks wait."""
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0] if marker and marker.args else request.config.getini("timeout"))
    with TaskDumpTimer(asyncio.get_running_loop(), timeout, request.node.nodeid):
        yield


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA plus certificates for the five services and the `admin` operator."""
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, trust_domain=TRUST_DOMAIN)
    return directory


@pytest.fixture(scope="session")
def foreign_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA with the same names: its certificates must be refused."""
    directory = tmp_path_factory.mktemp("foreign-pki")
    init_pki(directory, trust_domain=TRUST_DOMAIN)
    return directory


@pytest.fixture(scope="session")
async def database_url() -> str:
    url = os.environ.get(
        "STREAMMESH_TEST_DATABASE_URL",
        "postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh_test",
    )
    await ensure_database(url)
    return url


async def run_sql(database_url: str, statement: str) -> None:
    """Run one statement on its own connection to `database_url` (clean-up outside the code
    under test)."""
    sa_url = make_url(database_url)
    conn = await asyncpg.connect(
        host=sa_url.host, port=sa_url.port, user=sa_url.username, database=sa_url.database
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _drop_schema(database_url: str, schema: str) -> None:
    await run_sql(database_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
async def pg_schema(database_url: str) -> AsyncIterator[str]:
    """A schema name of this test's own; dropped (with everything in it) afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield schema
    await _drop_schema(database_url, schema)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ.get("STREAMMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    prefix = f"smtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
