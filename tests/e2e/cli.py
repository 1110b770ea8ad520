"""Driving the real `streammesh` command against a test's stack: its environment, one-shot runs,
and conversations through its prompts, as a person at a terminal would."""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from streammesh.cli.stack import START_ORDER, StackConfig
from tests.environment import clean_environ

__all__ = ["Conversation", "drop_test_data", "run_cli", "stack_env"]


def stack_env(config: StackConfig) -> dict[str, str]:
    """A clean environment (nothing the caller exported) pointing the CLI at `config`'s stack."""
    env = clean_environ() | {"STREAMMESH_STATE_DIR": str(config.state_dir)}
    for name in START_ORDER:
        env[f"STREAMMESH_{name.upper()}_PORT"] = str(config.port(name))
        env[f"STREAMMESH_{name.upper()}_METRICS_PORT"] = str(config.metrics_port(name))
    env |= {
        "STREAMMESH_HOST": config.host,
        "STREAMMESH_DATABASE_URL": config.database_url,
        "STREAMMESH_DB_SCHEMA_PREFIX": config.db_schema_prefix,
        "STREAMMESH_REDIS_URL": config.redis_url,
        "STREAMMESH_STREAM_PREFIX": config.stream_prefix,
        "STREAMMESH_AUTH_REDIS_PREFIX": config.auth_redis_prefix,
        "STREAMMESH_TRUST_DOMAIN": config.trust_domain,
        "STREAMMESH_LEAF_LIFETIME_SECONDS": str(config.leaf_lifetime_seconds),
        "STREAMMESH_TLS_RELOAD_SECONDS": str(config.tls_reload_seconds),
        "STREAMMESH_PARTITIONS": str(config.partitions),
        "STREAMMESH_LOG_LEVEL": config.log_level,
    }
    return env


async def drop_test_data(config: StackConfig) -> None:
    """Drop the stack's schemas and delete its Redis keys."""
    import asyncpg

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


async def run_cli(
    env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120
) -> tuple[int, str, str]:
    """`streammesh <args>`, fed `stdin` (else stdin is closed); its exit status, stdout and
    stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streammesh.cli.main",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    feed = None if stdin is None else stdin.encode()
    out, err = await asyncio.wait_for(process.communicate(feed), timeout)
    return process.returncode or 0, out.decode(), err.decode()


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
