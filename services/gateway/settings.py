"""Gateway settings (env prefix STREAMMESH_GATEWAY_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.gateway.revocations import FailMode
from streammesh.mesh.settings import ServiceSettings

__all__ = ["GatewaySettings"]


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
    upstream_timeout_seconds: float = Field(10, gt=0, description="default per upstream call")
    audit_queue_size: int = Field(
        10_000,
        ge=1,
        description="refused calls waiting to be recorded at auth; more are dropped and counted",
    )
    audit_timeout_seconds: float = Field(2, gt=0, description="per RecordAuditEvent call to auth")
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
