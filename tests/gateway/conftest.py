"""The gateway in front of real services, in-process over real mTLS on port 0: auth (its own
Postgres schema and Redis prefix, a fresh secret key file), ingest (Redis streams under a private
prefix) and storage (its own schema). One stack and one set of users per test module.

Users are created the way an operator bootstraps them (AuthService.CreateUser over mTLS with the
`admin` operator certificate), then enrol TOTP and log in through the gateway with the two-step
flow, so every token a test uses is a real one from auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import asyncpg
import grpc
import pyotp
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from services.auth.server import AuthDependencies, build_dependencies
from services.auth.server import create_server as create_auth_server
from services.auth.settings import AuthSettings
from services.gateway.audit import AuditTrail
from services.gateway.revocations import RevocationFollower, RevocationList
from services.gateway.server import create_audit_trail, create_revocation_follower
from services.gateway.server import create_server as create_gateway_server
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import Upstreams
from services.ingest.registry_client import RegistryClient
from services.ingest.schema_cache import SchemaCache
from services.ingest.server import IngestDeps, schema_cache
from services.ingest.server import create_server as create_ingest_server
from services.ingest.settings import IngestSettings
from services.storage.server import StorageDeps, create_event_pool
from services.storage.server import create_server as create_storage_server
from services.storage.settings import StorageSettings
from streammesh.api.auth.v1 import auth_pb2, auth_pb2_grpc
from streammesh.api.gateway.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from streammesh.mesh import MeshServer, TlsMaterial, create_channel, service_config
from streammesh.mesh.client import TlsFiles
from streammesh.mesh.postgres import create_engine, load_migrations, migrate
from streammesh.mesh.settings import write_secret_file
from streammesh.streams import StreamLayout
from tests.conftest import TRUST_DOMAIN

if TYPE_CHECKING:
    AuthStub = auth_pb2_grpc.AuthServiceAsyncStub
    GatewayStub = gateway_pb2_grpc.GatewayServiceAsyncStub
    AdminStub = admin_pb2_grpc.AdminServiceAsyncStub
else:
    AuthStub = auth_pb2_grpc.AuthServiceStub
    GatewayStub = gateway_pb2_grpc.GatewayServiceStub
    AdminStub = admin_pb2_grpc.AdminServiceStub

PASSWORD = "correct horse battery staple"
ROLE_SETS: dict[str, tuple[str, ...]] = {
    "producer": ("producer",),
    "analyst": ("analyst",),
    "admin": ("admin",),
    "producer+analyst": ("producer", "analyst"),
    "schema-admin": ("schema-admin",),
}
"""The people every module gets, by name: their roles."""


@dataclass
class Person:
    """A real user with real tokens from a two-step login through the gateway."""

    username: str
    roles: tuple[str, ...]
    totp_secret: str
    access_token: str
    refresh_token: str
    recovery_codes: list[str] = field(default_factory=list)

    def bearer(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.access_token}"),)


@dataclass
class Stack:
    """The running servers and the clients the tests use."""

    pki_dir: Path
    gateway_settings: GatewaySettings
    auth_settings: AuthSettings
    auth_deps: AuthDependencies
    audit: AuditTrail
    gateway_channel: grpc.aio.Channel
    gateway: GatewayStub
    admin: AdminStub
    operator: AuthStub
    """AuthService over mTLS with the `admin` operator certificate (the break-glass path)."""
    storage_port: int
    gateway_port: int
    redis: aioredis.Redis
    layout: StreamLayout
    """The streams ingest appends to (no processor runs unless a test starts one)."""
    people: dict[str, Person] = field(default_factory=dict)
    ingest_server: MeshServer | None = None
    """The in-process ingest, for tests that stop it."""
    storage_server: MeshServer | None = None
    """The in-process storage, for tests that read its metrics."""
    schemas: SchemaCache | None = None
    """Ingest's schema cache (following storage's change log)."""
    jwks_http_port: int | None = None
    """The HTTPS JWKS listener's port, when the module's GATEWAY_SETTINGS turn it on."""
    storage_schema: str = ""
    """Storage's Postgres schema (for tests that run storage's maintenance on it)."""

    @property
    def admin_person(self) -> Person:
        return self.people["admin"]


async def _drop_schemas(database_url: str, schemas: Iterable[str]) -> None:
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _delete_keys(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def gateway_channel(port: int, pki_dir: Path) -> grpc.aio.Channel:
    """A client of the public listener: TLS that trusts our CA, no client certificate."""
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials((pki_dir / "ca.pem").read_bytes()),
        options=[("grpc.ssl_target_name_override", "gateway")],
    )


_Server = TypeVar("_Server", bound=MeshServer)


async def _started(mesh: _Server, exit_stack: contextlib.AsyncExitStack) -> _Server:
    await mesh.start()
    exit_stack.push_async_callback(mesh.stop, 0)
    return mesh


async def enrol_and_login(stack: Stack, username: str, roles: tuple[str, ...]) -> Person:
    """CreateUser (operator), then TOTP enrolment and the two login steps through the gateway."""
    await stack.operator.CreateUser(
        auth_pb2.CreateUserRequest(username=username, password=PASSWORD, roles=list(roles)),
        timeout=10,
    )
    begun = await stack.gateway.BeginTotpEnrollment(
        gateway_pb2.BeginTotpEnrollmentRequest(username=username, password=PASSWORD), timeout=10
    )
    totp = pyotp.TOTP(begun.secret)
    confirmed = await stack.gateway.ConfirmTotpEnrollment(
        gateway_pb2.ConfirmTotpEnrollmentRequest(
            username=username, password=PASSWORD, code=totp.now()
        ),
        timeout=10,
    )
    started = await stack.gateway.StartLogin(
        gateway_pb2.StartLoginRequest(username=username, password=PASSWORD), timeout=10
    )
    # The confirming code's time step counts as used; the next step's code is within the
    # accepted window (one step of drift) and later than it.
    completed = await stack.gateway.CompleteLogin(
        gateway_pb2.CompleteLoginRequest(
            challenge=started.challenge, totp_code=totp.at(time.time() + 30)
        ),
        timeout=10,
    )
    tokens = completed.tokens
    assert tokens.access_token and tokens.refresh_token
    assert set(tokens.roles) == set(roles)
    return Person(
        username=username,
        roles=roles,
        totp_secret=begun.secret,
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        recovery_codes=list(confirmed.recovery_codes),
    )


@dataclass
class GatewayReplica:
    """One more gateway replica and what the test reaches it with."""

    name: str
    stub: GatewayStub
    revocations: RevocationList
    follower: RevocationFollower


async def _gateway_parts(
    settings: GatewaySettings, pki_dir: Path, exit_stack: contextlib.AsyncExitStack
) -> tuple[Upstreams, AuditTrail, RevocationList, RevocationFollower]:
    """A gateway's channels, audit trail and live revocation feed, closed by `exit_stack`."""
    upstreams = Upstreams(settings, TlsFiles.of(pki_dir, "gateway"))
    exit_stack.push_async_callback(upstreams.close)
    audit = create_audit_trail(settings, upstreams)
    exit_stack.push_async_callback(audit.close, 5)
    revocations, follower = create_revocation_follower(settings, upstreams)
    follower.start()
    exit_stack.push_async_callback(follower.close)
    assert await follower.wait_live(10), "no revocation snapshot from auth"
    return upstreams, audit, revocations, follower


async def start_gateway(
    stack: Stack, settings: GatewaySettings, name: str, exit_stack: contextlib.AsyncExitStack
) -> GatewayReplica:
    """Another gateway with `settings` (its own channels, audit trail and revocation feed),
    stopped by `exit_stack`."""
    upstreams, audit, revocations, follower = await _gateway_parts(
        settings, stack.pki_dir, exit_stack
    )
    mesh = await _started(
        create_gateway_server(settings, upstreams, audit, revocations), exit_stack
    )
    channel = gateway_channel(mesh.port, stack.pki_dir)
    exit_stack.push_async_callback(channel.close)
    stub = cast(GatewayStub, gateway_pb2_grpc.GatewayServiceStub(channel))
    return GatewayReplica(name, stub, revocations, follower)


@pytest.fixture(scope="module")
async def stack(
    request: pytest.FixtureRequest,
    pki_dir: Path,
    database_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """The stack of this module; a module may set GATEWAY_SETTINGS, INGEST_SETTINGS and
    STORAGE_SETTINGS (dicts) to override the gateway's, ingest's and storage's settings (the revocation staleness bound is 30 s
    here unless GATEWAY_SETTINGS sets it)."""
    run = uuid.uuid4().hex[:12]
    auth_schema, storage_schema = f"t_{run}_auth", f"t_{run}_storage"
    redis_prefix = f"smtest:{run}:"
    secret_key_file = tmp_path_factory.mktemp("gateway-secrets") / "auth-secret-key"
    write_secret_file(secret_key_file)
    async with contextlib.AsyncExitStack() as exit_stack:
        exit_stack.push_async_callback(_delete_keys, redis_url, redis_prefix)
        exit_stack.push_async_callback(_drop_schemas, database_url, [auth_schema, storage_schema])

        auth_settings = AuthSettings(
            port=0,
            tls_dir=pki_dir,
            trust_domain=TRUST_DOMAIN,
            database_url=database_url,
            db_schema=auth_schema,
            redis_url=redis_url,
            redis_prefix=f"{redis_prefix}auth:",
            secret_key_file=secret_key_file,
            # Attack and matrix tests make many failing calls from 127.0.0.1; auth's per-source
            # throttle is tested with auth, not here.
            source_free_failures=1000,
            backoff_base_seconds=0,
        )
        auth_deps = await build_dependencies(auth_settings)
        exit_stack.push_async_callback(auth_deps.close)
        auth = await _started(create_auth_server(auth_settings, auth_deps), exit_stack)

        engine = create_engine(database_url, schema=storage_schema, application_name="gw-tests")
        exit_stack.push_async_callback(engine.dispose)
        await migrate(
            engine,
            schema=storage_schema,
            migrations=load_migrations("services.storage.migrations"),
        )
        pool = await create_event_pool(
            database_url, schema=storage_schema, application_name="gw-tests"
        )
        exit_stack.push_async_callback(pool.close)
        storage = await _started(
            create_storage_server(
                StorageSettings(
                    port=0,
                    tls_dir=pki_dir,
                    trust_domain=TRUST_DOMAIN,
                    db_schema=storage_schema,
                    **getattr(request.module, "STORAGE_SETTINGS", {}),
                ),
                StorageDeps(engine=engine, pool=pool),
            ),
            exit_stack,
        )

        redis_client = aioredis.Redis.from_url(redis_url)
        exit_stack.push_async_callback(redis_client.aclose)
        layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=2)
        await layout.ensure_group(redis_client)
        ingest_settings = IngestSettings(
            port=0,
            tls_dir=pki_dir,
            trust_domain=TRUST_DOMAIN,
            partitions=2,
            storage_target=f"127.0.0.1:{storage.port}",
            **getattr(request.module, "INGEST_SETTINGS", {}),
        )
        registry = RegistryClient(
            ingest_settings.storage_target,
            TlsFiles.of(pki_dir, "ingest"),
            timeout_seconds=ingest_settings.registry_timeout_seconds,
        )
        exit_stack.push_async_callback(registry.close)
        schemas = schema_cache(ingest_settings, registry)
        schemas.start()
        exit_stack.push_async_callback(schemas.stop)
        ingest = await _started(
            create_ingest_server(
                ingest_settings, IngestDeps(redis_client, layout, schemas=schemas)
            ),
            exit_stack,
        )

        settings = GatewaySettings(
            port=0,
            tls_dir=pki_dir,
            trust_domain=TRUST_DOMAIN,
            auth_target=f"127.0.0.1:{auth.port}",
            ingest_target=f"127.0.0.1:{ingest.port}",
            storage_target=f"127.0.0.1:{storage.port}",
            **{
                # Every server of the stack shares this test process's event loop: on a loaded
                # machine a heartbeat can be late by more than the default 2 s, which would fail
                # unrelated tests closed. test_revocations asks for the default.
                "revocation_max_staleness_seconds": 30.0,
                **getattr(request.module, "GATEWAY_SETTINGS", {}),
            },
        )
        upstreams, audit, revocations, _ = await _gateway_parts(settings, pki_dir, exit_stack)
        gateway = await _started(
            create_gateway_server(settings, upstreams, audit, revocations), exit_stack
        )

        channel = gateway_channel(gateway.port, pki_dir)
        exit_stack.push_async_callback(channel.close)
        operator_channel = create_channel(
            f"127.0.0.1:{auth.port}",
            TlsMaterial.load(pki_dir, "admin"),
            server_name="auth",
            config=service_config("streammesh.auth.v1.AuthService", health_checked=False),
        )
        exit_stack.push_async_callback(operator_channel.close)
        built = Stack(
            pki_dir=pki_dir,
            gateway_settings=settings,
            auth_settings=auth_settings,
            auth_deps=auth_deps,
            audit=audit,
            gateway_channel=channel,
            gateway=cast(GatewayStub, gateway_pb2_grpc.GatewayServiceStub(channel)),
            admin=cast(AdminStub, admin_pb2_grpc.AdminServiceStub(channel)),
            operator=cast(AuthStub, auth_pb2_grpc.AuthServiceStub(operator_channel)),
            storage_port=storage.port,
            gateway_port=gateway.port,
            redis=redis_client,
            layout=layout,
            ingest_server=ingest,
            storage_server=storage,
            schemas=schemas,
            jwks_http_port=gateway.jwks_http.port if gateway.jwks_http else None,
            storage_schema=storage_schema,
        )
        logins = [
            enrol_and_login(built, f"gw-{name.replace('+', '-')}-{run[:6]}", roles)
            for name, roles in ROLE_SETS.items()
        ]
        built.people = dict(zip(ROLE_SETS, await asyncio.gather(*logins), strict=True))
        yield built


async def audit_events(
    stack: Stack,
    *,
    since: dt.datetime,
    action: str,
    match: Callable[[admin_pb2.AuditEvent], bool] = lambda event: True,
    expect: int = 1,
    timeout: float = 10.0,
) -> list[admin_pb2.AuditEvent]:
    """The `denied` audit events with `action` since `since` that `match`, read back through the
    gateway's AdminService as the admin; waits until `expect` of them arrived (the gateway
    reports refusals in the background)."""
    request = admin_pb2.ListAuditEventsRequest(action=action, outcome="denied", page_size=500)
    request.start_time.FromDatetime(since)
    deadline = time.monotonic() + timeout
    while True:
        reply = await stack.admin.ListAuditEvents(
            request, metadata=stack.admin_person.bearer(), timeout=10
        )
        found = [event for event in reply.events if match(event)]
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)
