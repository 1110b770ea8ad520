"""Processor settings (env prefix STREAMMESH_PROCESSOR_)."""

from __future__ import annotations

import os
import socket

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from streammesh.mesh.settings import ServiceSettings

__all__ = ["ProcessorSettings"]


class ProcessorSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMMESH_PROCESSOR_", frozen=True, extra="ignore"
    )

    port: int = 50054
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding the streams")
    stream_prefix: str = Field(
        "streammesh:events", description="streams are <prefix>:stream:{<prefix>:p<n>}"
    )
    partitions: int = Field(8, ge=1, le=1024, description="must match ingest")
    group: str = Field("processors", description="consumer group shared by all processors")
    consumer: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="this worker's consumer name; unique per replica; default <hostname>-<pid>",
    )
    storage_target: str = Field("127.0.0.1:50055", description="storage replicas (host:port,...)")
    read_count: int = Field(
        32,
        ge=1,
        le=1000,
        description="entries per partition per read (bounded: a read is held in memory)",
    )
    store_max_events: int = Field(
        2000, ge=1, le=10_000, description="events per StoreEvents call (consecutive entries)"
    )
    store_max_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=12 * 1024 * 1024,
        description="bytes per StoreEvents call (under the 16 MiB message limit)",
    )
    store_across_max_events: int = Field(
        500,
        ge=0,
        le=10_000,
        description="events per StoreEvents call that carries several partitions' entries "
        "(a round's small groups share a call; a busy round makes several calls at once); "
        "0 stores every partition on its own",
    )
    block_ms: int = Field(1000, ge=1, description="how long a read waits for new entries")
    claim_idle_ms: int = Field(
        30_000, ge=100, description="reclaim entries of owned partitions idle this long"
    )
    store_timeout_seconds: float = Field(10.0, gt=0, description="per StoreEvents call")
    retry_backoff_seconds: float = Field(0.5, gt=0, description="pause after a failed store")
    lease_ttl_ms: int = Field(
        10_000,
        ge=200,
        description="partition lease and membership lifetime: how long a crashed processor's "
        "partitions wait before others take them over",
    )
    heartbeat_ms: int = Field(
        2_000, ge=20, description="membership heartbeat and lease renewal; <= lease_ttl_ms / 2"
    )
    trim_interval_seconds: float = Field(
        5.0, ge=0, description="how often owned partitions are trimmed (XTRIM MINID); 0 = never"
    )
    trim_retention_seconds: float = Field(
        0.0, ge=0, description="keep acknowledged entries at least this long (replay, debugging)"
    )
    trim_after_bytes: int = Field(
        2 * 1024 * 1024,
        ge=0,
        description="also trim a partition once this many bytes of it were acknowledged since "
        "its last trim, which bounds the Redis memory of acknowledged entries per partition; "
        "0 = by the interval only",
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        description="failed stores (outages excluded) after which an entry becomes a dead letter",
    )
    dead_letter_maxlen: int = Field(
        10_000, ge=1, description="the dead-letter stream is capped near this many entries"
    )
    engine_checkpoint_batches: int = Field(
        200,
        ge=1,
        le=10_000,
        description="a partition's engine state is saved (and the entries it covers "
        "acknowledged) after this many processed batches...",
    )
    engine_checkpoint_seconds: float = Field(
        2.0,
        gt=0,
        le=300,
        description="...or this long after its last save, and before its lease is released; "
        "it bounds what a new owner replays and how long processed entries stay pending",
    )
    engine_out_of_orderness_ms: int = Field(
        2_000, ge=0, description="watermark = largest event time seen on a partition - this"
    )
    engine_idle_timeout_ms: int = Field(
        10_000,
        ge=1,
        description="a partition without events this long (processing time) has its "
        "watermark advance with the clock, so its windows close",
    )
    definitions_poll_seconds: float = Field(
        0.5,
        gt=0,
        le=5,
        description="how often rule and window changes are fetched from storage (a change "
        "runs on every processor within this plus two calls)",
    )
    failpoint: str = Field(
        "",
        description="test-only fault injection: crash-before-store[:N] or crash-after-store[:N]",
    )

    @model_validator(mode="after")
    def _heartbeat_fits_lease(self) -> ProcessorSettings:
        if self.heartbeat_ms * 2 > self.lease_ttl_ms:
            raise ValueError("heartbeat_ms must be at most half of lease_ttl_ms")
        return self
