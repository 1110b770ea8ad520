"""Gateway settings (env prefix STREAMMESH_GATEWAY_)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.gateway.revocations import FailMode
from streammesh.mesh.settings import ServiceSettings

__all__ = ["RECYCLE_MARGIN_SECONDS", "GatewaySettings"]

RECYCLE_MARGIN_SECONDS = 10.0
"""The listener's grace must outlast a Publish stream's maximum age by this much: the recycle
waits up to 5 s for ingest's acknowledgements and 2 s for the client's half-close."""


class GatewaySettings(ServiceSettings):
    """The public listener, the upstream targets, token checks and the edge audit queue."""

    model_config = SettingsConfigDict(env_prefix="STREAMMESH_GATEWAY_", frozen=True, extra="ignore")

    port: int = 50051
    auth_target: str = Field("127.0.0.1:50052", description="auth replicas (host:port,...)")
    ingest_target: str = Field("127.0.0.1:50053", description="ingest replicas")
    storage_target: str = Field("127.0.0.1:50055", description="storage replicas")
    token_issuer: str = Field("streammesh-auth", description="required iss of access tokens")
    token_audience: str = Field("streammesh", description="required aud of access tokens")
    token_leeway_seconds: float = Field(30, ge=0, le=300, description="clock skew allowed")
    jwks_max_age_seconds: float = Field(
        60,
        gt=0,
        le=3600,
        description=(
            "refresh auth's JWKS this often. This is the revocation bound: a key auth retires "
            "stops verifying here at most this many seconds later (while auth answers; during "
            "an auth outage the last keys fetched stay in use and a refetch is tried every "
            "jwks_min_refetch_seconds)"
        ),
    )
    jwks_min_refetch_seconds: float = Field(
        10, gt=0, description="unknown kid: refetch the JWKS at most this often"
    )
    jwks_http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "serve the token keys at `https://<host>:<port>/.well-known/jwks.json` (the gateway's "
            "certificate) for JWT libraries that take a JWKS URL; off when unset, 0 picks a port"
        ),
    )
    upstream_timeout_seconds: float = Field(10, gt=0, description="default per upstream call")
    upstream_max_in_flight: int | None = Field(
        256,
        ge=1,
        description="unary calls in flight to each upstream service (auth, ingest, storage) at "
        "most; past it a call fails at once with UNAVAILABLE (ErrorInfo reason "
        "UPSTREAM_CONCURRENCY_LIMIT, RetryInfo 0.1 s) instead of queueing; unset: no limit",
    )
    audit_queue_size: int = Field(
        10_000,
        ge=1,
        description="refused calls waiting to be recorded at auth; more are dropped and counted",
    )
    audit_timeout_seconds: float = Field(2, gt=0, description="per RecordAuditEvent call to auth")
    max_connection_age_grace_seconds: float = Field(
        330,
        ge=1,
        description="calls still open on a connection that got its max-age GOAWAY are cut "
        "this long after it. On the gateway it must exceed publish_stream_max_age_seconds by "
        f"{RECYCLE_MARGIN_SECONDS:.0f} s, so a Publish stream is recycled before it is cut",
    )
    publish_stream_max_age_seconds: float = Field(
        300,
        ge=1,
        description="a client's Publish stream is ended at this age with UNAVAILABLE, ErrorInfo "
        "reason STREAM_RECYCLED and RetryInfo 0, once ingest acknowledged what was in flight; "
        "the client re-opens it (on a new connection once its own got GOAWAY) and resends what "
        "was not acknowledged",
    )
    publish_window_batches: int = Field(
        256,
        ge=1,
        description="per Publish stream: forwarded batches ingest has not acknowledged yet, kept "
        "for resending when an ingest stream ends; the client is not read while it is full",
    )
    publish_window_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="per Publish stream: their size, at most (one batch always fits)",
    )
    publish_resume_attempts: int = Field(
        8,
        ge=0,
        description="ingest streams ended with UNAVAILABLE (max connection age, a replica "
        "restarting) are re-opened and the unacknowledged batches resent; after this many "
        "attempts in a row without an acknowledgement the client's stream ends with UNAVAILABLE",
    )
    publish_resume_seconds: float = Field(
        10,
        gt=0,
        description="... or after this many seconds of such attempts",
    )

    revocation_max_staleness_seconds: float = Field(
        2.0,
        gt=0,
        le=300,
        description=(
            "auth's revocation feed must have confirmed the gateway's revocation list within "
            "this many seconds (auth sends a heartbeat every 0.5 s); past that, and before the "
            "first confirmation after start-up, revocation_fail_mode applies"
        ),
    )
    revocation_fail_mode: FailMode = Field(
        FailMode.OPEN,
        description=(
            "open: accept authenticated calls while the list is stale, with a warning, so a "
            "revocation made meanwhile applies when the feed is back or when the token expires; "
            "closed: refuse them with UNAVAILABLE and a RetryInfo"
        ),
    )
    revocation_startup_wait_seconds: float = Field(
        10,
        ge=0,
        le=300,
        description="at start-up, wait this long for the first revocation snapshot before serving",
    )

    @model_validator(mode="after")
    def _recycled_before_cut(self) -> Self:
        if (
            self.max_connection_age_grace_seconds
            < self.publish_stream_max_age_seconds + RECYCLE_MARGIN_SECONDS
        ):
            raise ValueError(
                "max_connection_age_grace_seconds must be at least publish_stream_max_age_seconds "
                f"+ {RECYCLE_MARGIN_SECONDS:.0f}, or Publish streams are cut before they are "
                "recycled"
            )
        return self
