"""Gateway settings (env prefix STREAMMESH_GATEWAY_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

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
    jwks_http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "serve the token keys at https://<host>:<port>/.well-known/jwks.json (the gateway's "
            "certificate) for JWT libraries that take a JWKS URL; off when unset, 0 picks a port"
        ),
    )
    upstream_timeout_seconds: float = Field(10, gt=0, description="default per upstream call")
    audit_queue_size: int = Field(
        10_000,
        ge=1,
        description="refused calls waiting to be recorded at auth; more are dropped and counted",
    )
    audit_timeout_seconds: float = Field(2, gt=0, description="per RecordAuditEvent call to auth")
