"""Typed settings shared by every service. Each service subclasses `ServiceSettings` with its own
env prefix (`STREAMMESH_<SERVICE>_`), builds it once in `main()` and passes it down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streammesh.mesh.identity import DEFAULT_TRUST_DOMAIN
from streammesh.mesh.tracing import TracingConfig

__all__ = ["ServiceSettings", "default_state_dir", "read_secret_file", "write_secret_file"]


def default_state_dir() -> Path:
    """Where the CLI keeps PKI, secrets, logs and pid files: $STREAMMESH_STATE_DIR, else XDG."""
    explicit = os.environ.get("STREAMMESH_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "streammesh"


def read_secret_file(path: Path) -> bytes:
    """Read a secret from a file, refusing files that other users can read."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by other users; chmod 600 it")
    data = path.read_bytes().strip()
    if not data:
        raise ValueError(f"{path} is empty")
    return data


class ServiceSettings(BaseSettings):
    """Listener, identity and runtime limits common to all services."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(0, ge=0, le=65535, description="port; 0 picks a free one")
    tls_dir: Path = Field(
        default_factory=lambda: default_state_dir() / "pki",
        description="folder with ca.pem, <service>.pem and <service>-key.pem; default "
        "$STREAMMESH_STATE_DIR/pki",
    )
    trust_domain: str = Field(DEFAULT_TRUST_DOMAIN, description="SPIFFE trust domain")
    tls_reload_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="how often the service's mesh clients check their TLS files for a rotated "
        "certificate or CA bundle and swap in new channels (its listener takes new files at "
        "each new connection)",
    )
    policy_file: Path | None = Field(
        None,
        description="the peer policy (TOML: which mTLS identity may call which method) of the "
        "internal listeners; default the one shipped in the package (streammesh/mesh/policy.toml). "
        "The gateway's public listener guards with tokens and does not read it",
    )
    grace_seconds: float = Field(
        5.0,
        ge=0,
        description="on SIGTERM, calls and streams in flight get this long to finish (after "
        "the drain delay); then they are cancelled",
    )
    drain_delay_seconds: float = Field(
        1.0,
        ge=0,
        le=60,
        description="on SIGTERM, health says NOT_SERVING this long before new calls are "
        "refused, so that health-checked clients move to other replicas first",
    )
    health_interval_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        description="how often the service probes its Postgres/Redis (SELECT 1, PING); while "
        "one fails, its health says NOT_SERVING",
    )
    health_timeout_seconds: float = Field(
        1.0, gt=0, le=30, description="a dependency probe not answered this fast has failed"
    )
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="per message, both ways")
    max_connection_age_seconds: float = Field(
        300,
        ge=1,
        description="the listener sends GOAWAY to a connection this old (grpc adds +-10% jitter), "
        "so that round_robin clients spread over new replicas; new calls go to a new connection",
    )
    max_connection_age_grace_seconds: float = Field(
        30,
        ge=1,
        description="calls still open on a connection that got its max-age GOAWAY are cut "
        "(UNAVAILABLE) this long after it",
    )
    default_deadline_seconds: float = Field(
        30,
        ge=0,
        description="a call with one response whose client set no deadline ends with "
        "DEADLINE_EXCEEDED after this long (streams get none); 0: no default",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="address of the Prometheus /metrics HTTP listener; loopback unless a "
        "Prometheus on another host must scrape it (the endpoint has no TLS or auth)",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="port of the /metrics HTTP listener; 0: no listener (`streammesh up` "
        "gives each service one, 9551-9555)",
    )
    metrics_enabled: bool = Field(
        True,
        description="false: no gRPC metrics layer on the server and no /metrics listener (the "
        "services' per-batch counters stay); to measure what metrics cost (`streammesh bench "
        "--variants metrics`)",
    )
    log_level: str = Field("INFO", description="root log level")
    log_json: bool = Field(True, description="one JSON object per log line")
    tracing_exporter: Literal["none", "otlp", "console", "file"] = Field(
        "none",
        description="where OpenTelemetry spans go: none (tracing off, no cost per call), otlp "
        "(OTLP over gRPC to tracing_endpoint), console (stdout) or file (JSON lines at "
        "tracing_file)",
    )
    tracing_endpoint: str = Field(
        "http://127.0.0.1:4317",
        description="the OTLP gRPC receiver of the otlp exporter (http:// plaintext, https:// TLS)",
    )
    tracing_file: Path | None = Field(
        None, description="the file the file exporter appends one JSON span per line to"
    )
    tracing_sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of new traces recorded; a call that brings a trace context follows "
        "its caller's decision (parent-based)",
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio",
        description="the asyncio event loop implementation: asyncio's own, or uvloop (libuv)",
    )

    @model_validator(mode="after")
    def _tracing_file_given(self) -> ServiceSettings:
        if self.tracing_exporter == "file" and self.tracing_file is None:
            raise ValueError("tracing_exporter=file needs tracing_file")
        return self

    def tracing(self) -> TracingConfig:
        """The tracing fields as streammesh.mesh.tracing takes them."""
        return TracingConfig(
            exporter=self.tracing_exporter,
            endpoint=self.tracing_endpoint,
            file=self.tracing_file,
            sample_ratio=self.tracing_sample_ratio,
        )


def write_secret_file(path: Path, *, nbytes: int = 32) -> bool:
    """Create a random url-safe secret at `path` (mode 0600) unless one exists; True if created."""
    import base64
    import secrets

    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(base64.urlsafe_b64encode(secrets.token_bytes(nbytes)) + b"\n")
    return True
