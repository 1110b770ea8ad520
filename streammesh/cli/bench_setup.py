"""`streammesh bench`'s own stack and its lifecycle: the bench's settings (state, ports, schemas,
streams of its own), dropping its data, one bench per state folder, the bench user's login, and
SIGTERM unwinding like Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pyotp
import redis.asyncio as aioredis

from streammesh.backlog import WINDOW_BYTES_PER_ID
from streammesh.cli.admin import create_user_as_operator
from streammesh.cli.bench_load import connect_postgres
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.stack import START_ORDER, StackConfig, free_ports
from streammesh.client import GatewayClient
from streammesh.mesh.postgres import checked_identifier, ensure_database

__all__ = [
    "BACKLOG_LIMITS",
    "BENCH_ROLES",
    "backlog_bound",
    "bench_schemas",
    "bench_stack_config",
    "cancel_on_sigterm",
    "drop_bench_data",
    "exclusive",
    "keep_fresh",
    "login",
    "redis_baseline",
    "stack_limits",
]


MiB = 1024 * 1024
BACKLOG_LIMITS = {
    "ingest": {
        "STREAMMESH_INGEST_MAX_UNACKED_EVENTS": "200000",
        "STREAMMESH_INGEST_MAX_UNACKED_BYTES": str(32 * MiB),
        "STREAMMESH_INGEST_MAX_PARTITION_UNACKED_EVENTS": "100000",
        "STREAMMESH_INGEST_MAX_PARTITION_UNACKED_BYTES": str(16 * MiB),
        "STREAMMESH_INGEST_MAX_BATCH_EVENTS": "10000",
        "STREAMMESH_INGEST_IDEMPOTENCY_WINDOW_SECONDS": "60",
        "STREAMMESH_INGEST_IDEMPOTENCY_MAX_IDS": "100000",
    },
    "processor": {"STREAMMESH_PROCESSOR_TRIM_AFTER_BYTES": str(2 * MiB)},
    # The bench checks what was stored with one CountEvents over a phase's time range: a
    # closed loop of the default 60 s stores 2 to 5 million events, past the 1,000,000 an
    # analyst's count may read by default. Its own stack, its own bound (a count is an index
    # scan within the statement timeout).
    "storage": {
        "STREAMMESH_STORAGE_QUERY_MAX_ROWS": "100000000",
        "STREAMMESH_STORAGE_QUERY_TIMEOUT_MS": "120000",
    },
}
"""The back-pressure and idempotency window the bench stack runs with, set explicitly (over the
caller's environment; the window from --idempotency-window and --idempotency-max-ids, see
stack_limits), so that
the closed loop cannot grow Redis past a bound this run chose and printed
(services/ingest/pressure.py states the bound)."""
READ_COUNT = 32
"""The processor's read_count (its default): a partition's acknowledged entries wait at most
trim_after_bytes plus one read for their trim."""
QUEUED_EVENT_OVERHEAD = 120
"""Bytes a queued event carries beside its payload (id, key, type, times, producer), roughly."""
STREAM_OVERHEAD = 1.2
"""Redis memory per batch byte for entries of 2 kB or more (services/ingest/pressure.py)."""


def stack_limits(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """BACKLOG_LIMITS with the idempotency window of --idempotency-window (0: off) and
    --idempotency-max-ids."""
    window = {
        "STREAMMESH_INGEST_IDEMPOTENCY_WINDOW_SECONDS": str(args.idempotency_window),
        "STREAMMESH_INGEST_IDEMPOTENCY_MAX_IDS": str(args.idempotency_max_ids),
    }
    # The watermark lag the processing phases' arithmetic assumes (bench_processing).
    lag = {"STREAMMESH_PROCESSOR_ENGINE_OUT_OF_ORDERNESS_MS": str(args.out_of_orderness_ms)}
    return BACKLOG_LIMITS | {
        "ingest": BACKLOG_LIMITS["ingest"] | window,
        "processor": BACKLOG_LIMITS["processor"] | lag,
    }


def backlog_bound(args: argparse.Namespace, partitions: int) -> dict[str, Any]:
    """The limits as set, and the Redis memory bound above the baseline they give: the queue
    for the closed loop's entries (estimated from its batch and payload sizes) plus the
    idempotency window's fixed term (its ids held per partition at most, whatever the rate)."""
    env = stack_limits(args)
    ingest, processor = env["ingest"], env["processor"]
    limits = {name.removeprefix("STREAMMESH_").lower(): int(v) for name, v in ingest.items()}
    trim_after = int(processor["STREAMMESH_PROCESSOR_TRIM_AFTER_BYTES"])
    entry = args.closed_batch_size / partitions * (args.payload_bytes + QUEUED_EVENT_OVERHEAD)
    bound = (
        limits["ingest_max_unacked_bytes"] + partitions * (trim_after + READ_COUNT * entry)
    ) * STREAM_OVERHEAD
    window_ids = 0
    if limits["ingest_idempotency_window_seconds"]:
        # Two hashes per partition, each at most half the ids or one batch's slice.
        held = max(limits["ingest_idempotency_max_ids"], 2 * limits["ingest_max_batch_events"])
        window_ids = partitions * held
    window_bytes = window_ids * WINDOW_BYTES_PER_ID
    return limits | {
        "processor_trim_after_bytes": trim_after,
        "redis_queue_bound_bytes": int(bound),
        "redis_window_bound_bytes": window_bytes,
        "redis_bound_bytes": int(bound) + window_bytes,
    }


async def redis_baseline(bench: StackConfig) -> int:
    """Redis's used_memory with the bench stack up and none of its events written yet: what
    the printed bound stands on (its data was dropped before the stack came up)."""
    client = aioredis.Redis.from_url(bench.redis_url)
    try:
        return int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()


BENCH_ROLES = ["producer", "analyst", "rule-admin"]
"""Publish, and CountEvents/QueryEvents to check what was stored; the processing phases' windows
and rules, their alerts and results."""


def bench_stack_config(config: StackConfig) -> StackConfig:
    """The user's settings with the bench's own state, loopback ports, schemas and streams."""
    ports = {
        f"{name}_port": port
        for name, port in zip(START_ORDER, free_ports("127.0.0.1", len(START_ORDER)), strict=True)
    }
    stream = config.stream_prefix.removesuffix(":events")
    return config.model_copy(
        update={
            "state_dir": config.state_dir / "bench",
            "host": "127.0.0.1",
            "db_schema_prefix": f"{config.db_schema_prefix}bench_",
            "stream_prefix": f"{stream}:bench:events",
            "auth_redis_prefix": f"{config.auth_redis_prefix}bench:",
            **ports,
        }
    )


def bench_schemas(bench: StackConfig) -> list[str]:
    return [f"{bench.db_schema_prefix}{name}" for name in ("storage", "auth", "raw")]


async def drop_bench_data(bench: StackConfig) -> None:
    """Drop the bench schemas and delete every stream and auth key under the bench prefixes.
    Creates the database first when it does not exist yet (a fresh machine)."""
    await ensure_database(bench.database_url)
    conn = await connect_postgres(bench.database_url)
    try:
        for schema in bench_schemas(bench):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{checked_identifier(schema)}" CASCADE')
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(bench.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{bench.stream_prefix}:*", count=1000)]
        keys += [k async for k in client.scan_iter(match=f"{bench.auth_redis_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[bool]:
    """An advisory lock: one bench per state folder (they share schemas and stream names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


async def login(
    client: GatewayClient, bench: StackConfig, run: str, roles: Sequence[str] = BENCH_ROLES
) -> str:
    """A user `bench-<run>` with `roles` (default producer+analyst) made through the operator
    path (sign-up grants no roles), then TOTP enrolment and the two-step login through the
    gateway, as the demo does it."""
    username, password = f"bench-{run}", secrets.token_urlsafe(18)
    await create_user_as_operator(bench, username, password, list(roles))
    totp = pyotp.TOTP((await client.begin_totp(username, password)).secret)
    await client.confirm_totp(username, password, totp.now())
    # Confirming spent this step's code; the next step's is within the allowed drift.
    await client.login(username, password, totp.at(time.time() + totp.interval))
    return username


@contextlib.asynccontextmanager
async def keep_fresh(client: GatewayClient) -> AsyncIterator[None]:
    """Refresh the client's tokens in the background, a third of the access token's lifetime
    apart, so a long run (a soak) still opens streams and counts with a valid one."""

    async def refresh_forever() -> None:
        while True:
            try:
                tokens = await client.refresh()
            except grpc.aio.AioRpcError as error:  # a busy gateway: the token has time left
                print(f"token refresh failed ({describe_rpc_error(error)}); retrying", flush=True)
                await asyncio.sleep(5.0)
                continue
            await asyncio.sleep(max(5.0, tokens.expires_in.seconds / 3))

    task = asyncio.create_task(refresh_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def cancel_on_sigterm() -> AsyncIterator[None]:
    """SIGTERM unwinds like Ctrl-C does, so the stack is still stopped and the data dropped."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed = False
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            installed = True
    try:
        yield
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)
