"""What the CLI starts and calls: the stack's typed settings (`StackConfig`, env prefix
STREAMMESH_), the services in start order and their gRPC health names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streammesh.mesh.identity import DEFAULT_TRUST_DOMAIN
from streammesh.mesh.settings import default_state_dir

__all__ = ["GRPC_SERVICE", "START_ORDER", "StackConfig"]

START_ORDER = ("storage", "auth", "ingest", "processor", "gateway")
GRPC_SERVICE = {
    "gateway": "streammesh.gateway.v1.GatewayService",
    "auth": "streammesh.auth.v1.AuthService",
    "ingest": "streammesh.ingest.v1.IngestService",
    "processor": "streammesh.processor.v1.ProcessorService",
    "storage": "streammesh.storage.v1.StorageService",
}


class StackConfig(BaseSettings):
    """What the CLI starts, stops and calls: `streammesh up`, `status`, `down` and every
    command that talks to the stack (env prefix STREAMMESH_)."""

    model_config = SettingsConfigDict(env_prefix="STREAMMESH_", frozen=True, extra="ignore")

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="the CLI's folder: pki/, secrets/, logs/, run/, stack.json, session.json; "
        "default $XDG_STATE_HOME/streammesh, else ~/.local/state/streammesh",
    )
    host: str = Field(
        "127.0.0.1", description="the address every service listens on and the CLI calls"
    )
    gateway_port: int = Field(50051, description="the gateway's port (the public endpoint)")
    auth_port: int = Field(50052, description="auth's port")
    ingest_port: int = Field(50053, description="ingest's port")
    processor_port: int = Field(50054, description="the processor's port")
    storage_port: int = Field(50055, description="storage's port")
    gateway_metrics_port: int = Field(
        9551, description="the gateway's Prometheus /metrics port (HTTP, on host); 0: none"
    )
    auth_metrics_port: int = Field(9552, description="auth's /metrics port; 0: none")
    ingest_metrics_port: int = Field(9553, description="ingest's /metrics port; 0: none")
    processor_metrics_port: int = Field(9554, description="the processor's /metrics port; 0: none")
    storage_metrics_port: int = Field(9555, description="storage's /metrics port; 0: none")
    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh",
        description="the PostgreSQL database of storage and auth (created if missing)",
    )
    db_schema_prefix: str = Field(
        "",
        description="storage and auth use the schemas <prefix>storage and <prefix>auth, so "
        "several stacks can share one database",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="the Redis of ingest, processor and auth"
    )
    trust_domain: str = Field(
        DEFAULT_TRUST_DOMAIN, description="the SPIFFE trust domain of the certificates"
    )
    leaf_lifetime_seconds: float = Field(
        86_400,
        ge=60,
        description="how long the certificates `pki init` and `pki rotate` issue are valid "
        "(default 24 h); rotate well within it, `up` renews those past half of it",
    )
    tls_reload_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="every service's STREAMMESH_<SERVICE>_TLS_RELOAD_SECONDS; `pki rotate --ca` "
        "waits for it between its steps",
    )
    stream_prefix: str = Field(
        "streammesh:events",
        description="Redis keys of the event streams: <prefix>:stream:{<prefix>:p<n>}, one per partition",
    )
    auth_redis_prefix: str = Field(
        "streammesh:auth:",
        description="the start of every Redis key auth writes (throttle, challenges)",
    )
    partitions: int = Field(
        8, description="stream partitions; ingest and processor must agree, so set it here"
    )
    log_level: str = Field("INFO", description="every service's log level")

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def secret_key_file(self) -> Path:
        return self.state_dir / "secrets" / "auth-secret-key"

    @property
    def page_token_secret_file(self) -> Path:
        """Storage's page-token secret, one for every replica: a QueryEvents page token one
        replica issued is honoured by the next one round_robin sends the next page to."""
        return self.state_dir / "secrets" / "storage-page-token-secret"

    def port(self, name: str) -> int:
        return int(getattr(self, f"{name}_port"))

    def address(self, name: str) -> str:
        return f"{self.host}:{self.port(name)}"

    def metrics_port(self, name: str, replica: int = 1) -> int:
        """`name`'s /metrics port (replica k >= 2: the base port + 100 x (k - 1)); 0 when it
        has none."""
        base = int(getattr(self, f"{name}_metrics_port"))
        return base + 100 * (replica - 1) if base else 0

    def service_env(
        self, name: str, targets: Mapping[str, Sequence[str]] | None = None
    ) -> dict[str, str]:
        """The STREAMMESH_<SERVICE>_* variables one service process gets. `targets` lists the
        addresses of every replica of a service it calls (default: the one configured port)."""
        prefix = f"STREAMMESH_{name.upper()}_"

        def target(upstream: str) -> str:
            if targets and targets.get(upstream):
                return ",".join(targets[upstream])
            return self.address(upstream)

        env = {
            "HOST": self.host,
            "PORT": str(self.port(name)),
            "TLS_DIR": str(self.pki_dir),
            "TRUST_DOMAIN": self.trust_domain,
            "TLS_RELOAD_SECONDS": str(self.tls_reload_seconds),
            "LOG_LEVEL": self.log_level,
            # On the services' own host, as the gRPC port: loopback for a local stack. A port
            # another stack holds only costs this one its /metrics (a warning in its log).
            "METRICS_HOST": self.host,
            "METRICS_PORT": str(self.metrics_port(name)),
        }
        if name in ("storage", "auth"):
            env["DATABASE_URL"] = self.database_url
            env["DB_SCHEMA"] = f"{self.db_schema_prefix}{name}"
        if name == "storage":
            env["PAGE_TOKEN_SECRET_FILE"] = str(self.page_token_secret_file)
        if name == "auth":
            env |= {
                "SECRET_KEY_FILE": str(self.secret_key_file),
                "REDIS_URL": self.redis_url,
                "REDIS_PREFIX": self.auth_redis_prefix,
            }
        if name in ("ingest", "processor"):
            env |= {
                "REDIS_URL": self.redis_url,
                "STREAM_PREFIX": self.stream_prefix,
                "PARTITIONS": str(self.partitions),
            }
        if name in ("processor", "ingest"):
            env["STORAGE_TARGET"] = target("storage")
        if name == "gateway":
            env |= {
                "AUTH_TARGET": target("auth"),
                "INGEST_TARGET": target("ingest"),
                "STORAGE_TARGET": target("storage"),
            }
        return {prefix + key: value for key, value in env.items()}
