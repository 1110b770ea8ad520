"""Auth fixtures: a private schema and Redis prefix, a fresh secret key file, a TOTP clock the test
controls, and auth servers on port 0 that the tests call over real mTLS as the gateway (or as
another peer)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from services.auth.server import AuthDependencies, build_dependencies, create_server
from services.auth.settings import AuthSettings
from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.mesh.settings import write_secret_file
from tests.auth.flows import PASSWORD, FakeClock, Stub, async_stub
from tests.conftest import TRUST_DOMAIN

AUTH_SERVICE = "streammesh.auth.v1.AuthService"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def secret_key_file(tmp_path: Path) -> Path:
    """A key file as the CLI makes it (mode 0600)."""
    path = tmp_path / "secrets" / "auth-secret-key"
    write_secret_file(path)
    return path


@pytest.fixture
def auth_settings(
    pki_dir: Path,
    database_url: str,
    pg_schema: str,
    secret_key_file: Path,
    redis_url: str,
    redis_prefix: str,
) -> AuthSettings:
    """Defaults, except that delays are off (tests that check them turn them on)."""
    return AuthSettings(
        port=0,
        tls_dir=pki_dir,
        trust_domain=TRUST_DOMAIN,
        database_url=database_url,
        db_schema=pg_schema,
        secret_key_file=secret_key_file,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        backoff_base_seconds=0,
    )


ChannelFactory = Callable[[str], grpc.aio.Channel]


@dataclass
class Auth:
    """One running auth replica and what the tests reach it with."""

    settings: AuthSettings
    deps: AuthDependencies
    server: MeshServer
    pki_dir: Path
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, who: str) -> grpc.aio.Channel:
        """A channel presenting the certificate of `who` (closed after the test)."""
        channel = create_channel(
            f"127.0.0.1:{self.server.port}",
            TlsMaterial.load(self.pki_dir, who),
            server_name="auth",
            config=service_config(AUTH_SERVICE, health_checked=False),
        )
        self.channels.append(channel)
        return channel

    def stub(self, who: str = "gateway") -> Stub:
        return async_stub(self.channel(who))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.server.stop(0)
        await self.deps.close()


AuthFactory = Callable[..., Awaitable[Auth]]


@pytest.fixture
async def auth_factory(
    auth_settings: AuthSettings, clock: FakeClock, pki_dir: Path
) -> AsyncIterator[AuthFactory]:
    """Starts auth replicas with settings overridden (`lockout_threshold=3`, ...)."""
    started: list[Auth] = []

    async def start(**overrides: Any) -> Auth:
        settings = auth_settings.model_copy(update=overrides)
        deps = await build_dependencies(settings, clock=clock)
        server = create_server(settings, deps)
        await server.start()
        auth = Auth(settings=settings, deps=deps, server=server, pki_dir=pki_dir)
        started.append(auth)
        return auth

    yield start
    for auth in started:
        await auth.close()


@pytest.fixture
async def auth(auth_factory: AuthFactory) -> Auth:
    """One replica with the test defaults."""
    return await auth_factory()


@pytest.fixture
def deps(auth: Auth) -> AuthDependencies:
    return auth.deps


@pytest.fixture
def open_channel(auth: Auth) -> ChannelFactory:
    """Opens channels to the server with the certificate named (closed after the test)."""
    return auth.channel


@pytest.fixture
def stub(auth: Auth) -> Stub:
    """AuthService as the gateway sees it."""
    return auth.stub("gateway")


async def fetch_user_row(deps: AuthDependencies, username: str) -> dict[str, Any]:
    """The raw users row, straight from the database."""
    async with deps.engine.connect() as conn:
        row = (
            await conn.execute(text("SELECT * FROM users WHERE username = :u"), {"u": username})
        ).one()
    return dict(row._mapping)


async def audit_rows(deps: AuthDependencies, **where: str) -> list[dict[str, Any]]:
    """Audit rows matching the columns given, oldest first."""
    conditions = " AND ".join(f"{column} = :{column}" for column in where) or "true"
    async with deps.engine.connect() as conn:
        rows = await conn.execute(
            text(f"SELECT * FROM audit_events WHERE {conditions} ORDER BY id"),  # noqa: S608
            where,
        )
        return [dict(row._mapping) for row in rows]


@pytest.fixture
async def platform_admins(auth: Auth) -> None:
    """The platform admins the admin tests act as (`user:root-admin`, `user:keymaster`), made
    by the operator: auth checks every administrator against its own rows."""
    operator = auth.stub("admin")
    for name in ("root-admin", "keymaster"):
        await operator.CreateUser(
            auth_pb2.CreateUserRequest(username=name, password=PASSWORD, roles=["admin"]),
            timeout=10,
        )
