"""What `streammesh report` measures on the running stack, read-only: every replica's /metrics at
the start and the end of the window, Redis's and PostgreSQL's durability settings, the latency
from acknowledgement to storage of the events stored in the window, the certificates, whether
each listener refuses plaintext and certificate-less peers, and (with an admin session) accounts
and signing keys.

Each probe fails on its own: what it could not read is recorded as a gap with the reason, and the
analysis says "not measured" instead of guessing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.exceptions import RedisError

from streammesh.cli.stack import ServiceState, StackConfig, stack_status
from streammesh.cli.status_metrics import Reading, read_metrics
from streammesh.cli.status_view import metrics_url

__all__ = ["Certificate", "Listener", "Observation", "observe_listeners", "observe_window"]


@dataclass(frozen=True)
class Listener:
    """How one replica's gRPC port answers peers that should be refused."""

    replica: str
    plaintext_refused: bool
    anonymous_tls_refused: bool
    """A TLS client without a certificate (the gateway is public: it accepts one)."""


@dataclass(frozen=True)
class Certificate:
    name: str
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass
class Observation:
    """Everything one report is computed from (analysis is pure over this)."""

    window_seconds: float
    replicas: list[ServiceState]
    before: dict[str, Reading | None]
    after: dict[str, Reading | None]
    redis: dict[str, Any] = field(default_factory=dict)
    postgres: dict[str, str] = field(default_factory=dict)
    ack_to_stored_ms: dict[str, float] = field(default_factory=dict)
    stored_in_window: int | None = None
    certificates: list[Certificate] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    users: list[dict[str, Any]] | None = None
    signing_keys: list[dict[str, Any]] | None = None
    gaps: dict[str, str] = field(default_factory=dict)
    """What could not be measured, by topic, with the reason."""
    taken_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


async def _scrape_all(config: StackConfig, states: list[ServiceState]) -> dict[str, Reading | None]:
    async def one(state: ServiceState) -> Reading | None:
        url = metrics_url(config, state)
        return await read_metrics(url) if url else None

    readings = await asyncio.gather(*(one(state) for state in states))
    return {state.name: reading for state, reading in zip(states, readings, strict=True)}


async def _redis_facts(url: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, socket_timeout=3)
    try:
        settings = await client.config_get("appendonly")
        settings |= await client.config_get("appendfsync")
        settings |= await client.config_get("save")
        info = await client.info("persistence")
        memory = await client.info("memory")
    finally:
        await client.aclose()
    return {
        "appendonly": settings.get("appendonly", ""),
        "appendfsync": settings.get("appendfsync", ""),
        "save": settings.get("save", ""),
        "aof_last_write_status": info.get("aof_last_write_status", ""),
        "rdb_last_bgsave_status": info.get("rdb_last_bgsave_status", ""),
        "used_memory": int(memory.get("used_memory", 0)),
    }


def _postgres_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _postgres_facts(
    config: StackConfig, since: dt.datetime
) -> tuple[dict[str, str], dict[str, float], int]:
    """Durability settings, and ack-to-stored percentiles of the events stored since `since`
    (ingest_time is stamped when ingest queues the event, just before it acknowledges)."""
    connection = await asyncpg.connect(_postgres_dsn(config.database_url), timeout=5)
    try:
        settings = {
            name: str(await connection.fetchval(f"SHOW {name}"))
            for name in ("fsync", "synchronous_commit", "full_page_writes", "wal_level")
        }
        schema = f"{config.db_schema_prefix}storage"
        row = await connection.fetchrow(
            f"""
            SELECT count(*) AS stored,
                   percentile_cont(ARRAY[0.5, 0.99, 0.999]) WITHIN GROUP (
                       ORDER BY extract(epoch FROM store_time - ingest_time)) AS q,
                   max(extract(epoch FROM store_time - ingest_time)) AS worst
            FROM "{schema}".events WHERE store_time >= $1
            """,  # noqa: S608 (the schema is the stack's own setting, an identifier)
            since,
        )
    finally:
        await connection.close()
    percentiles: dict[str, float] = {}
    if row is not None and row["stored"]:
        p50, p99, p999 = row["q"]
        percentiles = {
            "p50": p50 * 1000,
            "p99": p99 * 1000,
            "p99.9": p999 * 1000,
            "max": float(row["worst"]) * 1000,
        }
    return settings, percentiles, int(row["stored"]) if row is not None else 0


def _certificates(pki_dir: Path) -> list[Certificate]:
    found = []
    for path in sorted(pki_dir.glob("*.pem")):
        if path.name.endswith("-key.pem"):
            continue
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            continue
        found.append(Certificate(path.stem, cert.not_valid_before_utc, cert.not_valid_after_utc))
    return found


async def _refuses_plaintext(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return True
    return False


async def _refuses_anonymous_tls(address: str, ca: bytes, server_name: str) -> bool:
    channel = grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(ca),
        options=[("grpc.ssl_target_name_override", server_name)],
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return True
    return False


async def observe_listeners(config: StackConfig, states: list[ServiceState]) -> list[Listener]:
    """Each replica probed as an attacker on the same host would: plaintext, then TLS with no
    client certificate."""
    ca = (config.pki_dir / "ca.pem").read_bytes()

    async def one(state: ServiceState) -> Listener:
        return Listener(
            state.name,
            await _refuses_plaintext(state.address),
            await _refuses_anonymous_tls(state.address, ca, state.service),
        )

    return list(await asyncio.gather(*(one(s) for s in states if s.running)))


async def observe_window(config: StackConfig, window: float) -> Observation:
    """Scrape, wait `window` seconds (the caller may drive load meanwhile), scrape again, then
    read the rest."""
    states = await stack_status(config)
    started_wall = dt.datetime.now(dt.UTC)
    started = time.monotonic()
    before = await _scrape_all(config, states)
    await asyncio.sleep(max(0.0, window - (time.monotonic() - started)))
    after = await _scrape_all(config, states)
    seen = Observation(
        window_seconds=time.monotonic() - started, replicas=states, before=before, after=after
    )
    try:
        seen.redis = await _redis_facts(config.redis_url)
    except (RedisError, OSError) as error:
        seen.gaps["redis"] = f"Redis at {config.redis_url} did not answer: {error}"
    try:
        seen.postgres, seen.ack_to_stored_ms, seen.stored_in_window = await _postgres_facts(
            config, started_wall
        )
    except (OSError, asyncpg.PostgresError) as error:
        seen.gaps["postgres"] = f"PostgreSQL did not answer: {error}"
    seen.certificates = _certificates(config.pki_dir)
    try:
        seen.listeners = await observe_listeners(config, states)
    except (OSError, ssl.SSLError) as error:
        seen.gaps["listeners"] = f"could not probe the listeners: {error}"
    return seen
