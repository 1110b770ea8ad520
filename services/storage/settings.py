"""Storage settings (env prefix STREAMMESH_STORAGE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.storage.partitions import PartitionPolicy
from streammesh.mesh.settings import ServiceSettings

__all__ = ["StorageSettings"]


class StorageSettings(ServiceSettings):
    """Listener, database and request limits of the storage service."""

    model_config = SettingsConfigDict(env_prefix="STREAMMESH_STORAGE_", frozen=True, extra="ignore")

    port: int = Field(50055, ge=0, le=65535, description="port; 0 picks a free one")
    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh",
        description="the PostgreSQL database holding the storage schema",
    )
    # The schema name is interpolated into DDL by the migration runner, so only plain identifiers.
    db_schema: str = Field(
        "storage", pattern=r"^[a-z_][a-z0-9_]{0,62}$", description="schema owned by storage"
    )
    pool_size: int = Field(
        10, ge=1, le=1000, description="pooled connections (and as many overflow)"
    )
    max_batch_events: int = Field(10_000, ge=1, description="events per StoreEvents batch, at most")
    # Ingest accepts keys up to 256 and types up to 128 characters; storage must accept whatever
    # ingest accepted, and stays well under btree's ~2.7 kB entry limit for the (key, seq) index.
    max_text_chars: int = Field(
        256, ge=1, le=600, description="key, type, content_type, producer and filter strings"
    )
    max_filter_keys: int = Field(100, ge=1, description="keys in an EventFilter, at most")
    page_token_secret_file: Path | None = Field(
        None,
        description="mode-0600 file of page-token secrets, one a line (the first signs, all "
        "verify); unset: a random key per process (tokens hold on that replica only)",
    )
    page_token_max_age_seconds: float = Field(
        86_400, gt=0, description="a QueryEvents page token expires after this long"
    )
    query_timeout_ms: int = Field(
        5000, ge=100, le=600_000, description="statement timeout of a query, count or aggregate"
    )
    query_max_rows: int = Field(
        1_000_000, ge=1, description="events a count or an aggregate reads, at most"
    )
    partition_days_ahead: int = Field(
        3, ge=1, le=366, description="daily partitions of events kept created beyond today"
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        description="events older than this many days (by ingest time) are dropped, a "
        "partition at a time; unset keeps them",
    )
    tenant_retention_days: dict[str, int] = Field(
        default_factory=dict,
        description='shorter retentions of single tenants, as JSON ({"acme": 7}); their rows '
        "are deleted in batches; at most retention_days",
    )
    partition_maintenance_seconds: float = Field(
        3600, gt=0, description="how often a replica tries a partition maintenance pass"
    )

    subscribe_poll_seconds: float = Field(
        0.5,
        gt=0,
        le=10,
        description="a live feed (one per table and tenant on a replica) reads this often "
        "without a wake-up (rows written outside storage, a lost notification)",
    )
    subscribe_heartbeat_seconds: float = Field(
        15, gt=0, le=3600, description="an idle SubscribeEvents stream sends a heartbeat this often"
    )
    subscribe_max_per_principal: int = Field(
        8,
        ge=1,
        description="concurrent live subscriptions of one user, over all storage replicas",
    )
    subscribe_lease_seconds: float = Field(
        30,
        ge=1,
        le=3600,
        description="a replica that died without ending its subscriptions holds their users' "
        "places for at most this long",
    )
    subscribe_max_per_replica: int = Field(
        256, ge=1, description="concurrent SubscribeEvents streams on a replica"
    )
    subscribe_buffer_items: int = Field(
        10_000,
        ge=1,
        description="items a live subscription that does not read may have waiting; past it "
        "the stream ends RESOURCE_EXHAUSTED (resume from the last resume token)",
    )
    subscribe_buffer_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="encoded bytes a live subscription may have waiting, as subscribe_buffer_items",
    )
    subscribe_shared_feeds: bool = Field(
        True,
        description="live subscriptions share one feed per table and tenant on a replica "
        "(false: each polls Postgres on its own every subscribe_poll_seconds)",
    )

    @model_validator(mode="after")
    def _tenant_retention_within_global(self) -> Self:
        # Dropping a partition removes every tenant's rows, so no tenant can keep longer.
        for tenant, days in self.tenant_retention_days.items():
            if days < 1:
                raise ValueError(f"tenant_retention_days[{tenant!r}] must be at least 1")
            if self.retention_days is not None and days > self.retention_days:
                raise ValueError(
                    f"tenant_retention_days[{tenant!r}] = {days} is longer than retention_days "
                    f"= {self.retention_days}: a partition dropped at the global retention "
                    "removes every tenant's events"
                )
        return self

    def partition_policy(self) -> PartitionPolicy:
        """The maintenance pass these settings ask for (services.storage.partitions)."""
        return PartitionPolicy(
            days_ahead=self.partition_days_ahead,
            retention_days=self.retention_days,
            tenant_retention_days=dict(self.tenant_retention_days),
        )
