"""PostgreSQL plumbing shared by the services that own a schema (storage, auth): an async engine
bound to the service's own schema, and a small versioned-SQL migration runner.

Each service owns one schema and never reads another's. Migrations are plain SQL files named
`NNNN_description.sql` in the service's `migrations` package, applied in order under an advisory
lock so that several replicas starting at once apply each one exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = [
    "Migration",
    "create_engine",
    "create_pool",
    "ensure_database",
    "load_migrations",
    "migrate",
]

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


def checked_identifier(name: str) -> str:
    """Schema names are interpolated into DDL, so only plain lower-case identifiers pass."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"{name!r} is not a plain identifier ([a-z_][a-z0-9_]*)")
    return name


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(package: str) -> list[Migration]:
    """Read `NNNN_name.sql` files from a package, in version order."""
    found = []
    for entry in resources.files(package).iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {package}: {versions}")
    return found


def create_engine(
    url: str,
    *,
    schema: str,
    application_name: str,
    pool_size: int = 10,
    connect_timeout_seconds: float = 5.0,
) -> AsyncEngine:
    """An asyncpg-backed engine whose connections resolve unqualified names in `schema`."""
    sa_url = make_url(url).set(drivername="postgresql+asyncpg")
    return create_async_engine(
        sa_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # Errors must not carry statement values (hashes, sealed secrets) into logs.
        hide_parameters=True,
        # A host that drops packets must not hold a call for asyncpg's default 60 s.
        connect_args={
            "server_settings": _session_settings(schema, application_name),
            "timeout": connect_timeout_seconds,
        },
    )


def _session_settings(schema: str, application_name: str) -> dict[str, str]:
    return {
        "search_path": checked_identifier(schema),
        "application_name": application_name,
        # A commit returns only once it is on disk: the processor acknowledges Redis entries
        # on that basis, whatever the server's default says.
        "synchronous_commit": "on",
    }


async def create_pool(
    url: str,
    *,
    schema: str,
    application_name: str,
    size: int = 10,
    connect_timeout_seconds: float = 5.0,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> asyncpg.Pool:
    """A plain asyncpg pool with the same session settings as `create_engine`, for a hot path
    that skips SQLAlchemy (its checkout, pre-ping and bind processing per call). `init` runs on
    every new connection (codecs, for example).

    A connection goes back to the pool without asyncpg's default reset (RESET ALL, CLOSE ALL,
    UNLISTEN *, advisory unlocks): one more round trip to Postgres per call, awaited before the
    caller's reply. The pool's users must therefore leave no session state behind (no SET,
    LISTEN, WITH HOLD cursor or session advisory lock); asyncpg still rolls back a transaction
    left open."""
    sa_url = make_url(url)
    return await asyncpg.create_pool(
        host=sa_url.host or "127.0.0.1",
        port=sa_url.port or 5432,
        user=sa_url.username or "postgres",
        password=sa_url.password,
        database=sa_url.database,
        min_size=0,  # connect on demand: a database that is down must not stop the start
        max_size=size,
        server_settings=_session_settings(schema, application_name),
        timeout=connect_timeout_seconds,
        init=init,
        reset=_keep_session,
    )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset beyond asyncpg's own rollback: nothing (see create_pool)."""


async def migrate(engine: AsyncEngine, *, schema: str, migrations: list[Migration]) -> list[int]:
    """Create `schema` if needed and apply the migrations it lacks; return the versions applied."""
    checked_identifier(schema)
    applied_now = []
    async with engine.begin() as conn:
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"migrate:{schema}"}
        )
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        await conn.execute(
            text(
                f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        rows = await conn.execute(text(f'SELECT version FROM "{schema}".schema_migrations'))  # noqa: S608
        done = {row[0] for row in rows}
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        for migration in migrations:
            if migration.version in done:
                continue
            # Multi-statement SQL needs asyncpg's simple-query path; same connection, same tx.
            await driver.execute(migration.sql)
            await conn.execute(
                text(f'INSERT INTO "{schema}".schema_migrations (version, name) VALUES (:v, :n)'),  # noqa: S608
                {"v": migration.version, "n": migration.name},
            )
            applied_now.append(migration.version)
    return applied_now


async def ensure_database(url: str) -> bool:
    """Create the database named in `url` if it does not exist (via the `postgres` database).
    Returns True when it was created."""
    sa_url = make_url(url)
    name = checked_identifier(sa_url.database or "")
    params = {
        "host": sa_url.host or "127.0.0.1",
        "port": sa_url.port or 5432,
        "user": sa_url.username or "postgres",
        "password": sa_url.password,
    }
    conn = await asyncpg.connect(database="postgres", **params)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            return False
        return True
    finally:
        await conn.close()
