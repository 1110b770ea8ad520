"""Ingest settings (env prefix STREAMMESH_INGEST_).

Durability: a batch is acknowledged after XADD returned (Redis accepted it). What an
acknowledgement survives depends on Redis persistence; see `services/ingest/queue.py`.
`require_aof` refuses to start when Redis has AOF off.

Back-pressure: a batch is refused with RESOURCE_EXHAUSTED (and a RetryInfo delay) when it would
take the events or bytes appended and not yet acknowledged past `max_unacked_events` /
`max_unacked_bytes` (all partitions) or `max_partition_unacked_events` /
`max_partition_unacked_bytes` (a partition it writes to), or while Redis memory is at its limit.
With the defaults, one ingest replica and entries of about 40 kB, the queue's Redis memory
stays within about 70 MiB above Redis's baseline for the default 8 partitions (the formula is in
`services/ingest/pressure.py`); the idempotency window adds at most
partitions x `idempotency_max_ids` x 80 bytes (61 MiB with the defaults).

Payload schemas: JSON payloads are checked against the tenant's schema registry in storage,
through a cache that follows storage's change log; see `services/ingest/schema_cache.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from streammesh.envelope import EnvelopeLimits
from streammesh.mesh.settings import ServiceSettings

__all__ = ["IngestSettings"]

MAX_PAYLOAD_BYTES = EnvelopeLimits().max_payload_bytes
MiB = 1024 * 1024


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="STREAMMESH_INGEST_", frozen=True, extra="ignore")

    port: int = 50053
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the streams")
    stream_prefix: str = Field(
        "streammesh:events", description="streams are <prefix>:stream:{<prefix>:p<n>}"
    )
    partitions: int = Field(8, ge=1, le=1024, description="number of stream partitions")
    group: str = Field("processors", description="the processors' consumer group")
    max_batch_events: int = Field(10_000, ge=1, description="events per batch, at most")
    redis_timeout_seconds: float = Field(5.0, gt=0, description="connect and command timeout")
    # Storage checks every event against the contract's 1 MiB again: a larger limit here would
    # acknowledge events that storage then refuses (and dead-letters).
    max_payload_bytes: int = Field(
        MAX_PAYLOAD_BYTES,
        ge=1,
        le=MAX_PAYLOAD_BYTES,
        description="payload size, at most (1 MiB, the contract; it can only be lowered)",
    )
    max_entry_bytes: int = Field(
        1024 * 1024,
        ge=64 * 1024,
        description="a stream entry (one partition's slice of a batch) is cut at about this size, "
        "so the processor's StoreEvents call stays far below the message limit",
    )
    require_aof: bool = Field(
        False, description="refuse to start unless Redis has AOF on (set it in production)"
    )
    max_unacked_events: int = Field(
        200_000,
        ge=0,
        description="events appended and not yet acknowledged by the processors, over all "
        "partitions, past which batches are refused; 0 = no limit",
    )
    max_unacked_bytes: int = Field(
        32 * MiB,
        ge=0,
        description="bytes (serialized batches) appended and not yet acknowledged, over all "
        "partitions, past which batches are refused; bounds the queue's Redis memory; 0 = no "
        "limit",
    )
    max_partition_unacked_events: int = Field(
        100_000, ge=0, description="the same events limit for one partition; 0 = no limit"
    )
    max_partition_unacked_bytes: int = Field(
        16 * MiB, ge=0, description="the same bytes limit for one partition; 0 = no limit"
    )
    max_redis_memory_bytes: int = Field(
        0,
        ge=0,
        description="Redis used_memory at which every batch is refused; 0 = "
        "redis_memory_fraction of Redis maxmemory, or no limit when maxmemory is 0",
    )
    redis_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="share of Redis maxmemory used when the above is 0"
    )
    pressure_sample_ms: int = Field(
        200,
        ge=10,
        le=10_000,
        description="how often the backlog counters and Redis memory are sampled",
    )
    retry_after_seconds: float = Field(
        1.0, gt=0, description="retry delay suggested with RESOURCE_EXHAUSTED"
    )
    idempotency_window_seconds: int = Field(
        60,
        ge=0,
        le=86_400,
        description="how long each accepted (tenant, event id) and its content digest are "
        "remembered in Redis (up to twice this long), so that publishing the id again is "
        "acknowledged as a duplicate (same content, not queued again) or refused per event as "
        "ID_CONFLICT (other content); shorter when a partition accepts more than "
        "idempotency_max_ids / 2 per this many seconds; 0 = off (storage still keeps the first "
        "event of an id and records conflicts it sees)",
    )
    idempotency_max_ids: int = Field(
        100_000,
        ge=2,
        description="ids the idempotency window holds per partition at most (at most 80 bytes "
        "of Redis each), so that its memory is bounded whatever the rate: a partition that "
        "accepts R events/s remembers each id at least min(window, this / 2 / R) seconds",
    )
    validate_payloads: bool = Field(
        True, description="check JSON payloads against the schema registry (storage)"
    )
    storage_target: str = Field(
        "127.0.0.1:50055", description="storage replicas, for the schema registry"
    )
    schema_poll_ms: int = Field(
        500,
        ge=50,
        le=10_000,
        description="how often storage's schema change log is polled (a new version is in use "
        "within about this long)",
    )
    schema_cache_subjects: int = Field(
        10_000, ge=1, description="(tenant, event type) pairs kept in the validator cache"
    )
    registry_timeout_seconds: float = Field(
        1.0,
        gt=0,
        description="deadline of a schema lookup (a batch with an uncached type waits that long "
        "at most when storage is down)",
    )
    unknown_types_when_unreachable: Literal["accept", "refuse"] = Field(
        "accept",
        description="for a tenant whose unknown-type policy is not cached while storage is "
        "unreachable: accept events of uncached types unchecked, or refuse them "
        "(SCHEMA_UNAVAILABLE)",
    )
