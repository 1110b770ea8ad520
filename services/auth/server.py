"""Wiring of the auth service: settings -> dependencies -> mesh server, the background maintenance
task, and `main()`."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from services.auth.accounts import Accounts
from services.auth.admin import Administration
from services.auth.audit import AuditLog
from services.auth.challenges import Challenges
from services.auth.keystore import KeyStore
from services.auth.passwords import Passwords, is_common_password
from services.auth.revocations import RevocationFeed, RevocationStore
from services.auth.service import AuthServicer
from services.auth.session_store import SessionStore
from services.auth.sessions import Sessions
from services.auth.settings import AuthSettings
from services.auth.startup import load_secret_box, sealed_with_this_key
from services.auth.store import AuthStore
from services.auth.tenants import TenantStore
from services.auth.throttle import Throttle, ThrottlePolicy
from services.auth.tokens import KeyRing, TokenIssuer
from streammesh.api.auth.v1 import auth_pb2, auth_pb2_grpc
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceBinding,
    create_mesh_server,
    run_until_signalled,
)
from streammesh.mesh.health import postgres_check, redis_check
from streammesh.mesh.metrics import ServiceMetrics
from streammesh.mesh.metrics.security import AuthEventsCollector
from streammesh.mesh.postgres import create_engine
from streammesh.mesh.redis_client import connect_redis
from streammesh.mesh.startup import reaching, run_service
from streammesh.mesh.tasks import raise_if_cancelled, stop_task

__all__ = [
    "SESSION_RETENTION_SECONDS",
    "AuthDependencies",
    "build_dependencies",
    "create_server",
    "main",
    "run_maintenance",
    "serve",
]

log = logging.getLogger(__name__)

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]

SESSION_RETENTION_SECONDS = 7 * 86_400
"""Ended sessions (and their token hashes) are deleted this long after they ended."""
SESSION_SWEEP_SECONDS = 3600
"""How often the maintenance task looks for such sessions."""


@dataclass(frozen=True)
class AuthDependencies:
    """What the handlers need, built once per process; `close()` releases the pools."""

    engine: AsyncEngine
    redis: aioredis.Redis
    store: AuthStore
    keys: KeyRing
    tokens: TokenIssuer
    sessions: Sessions
    throttle: Throttle
    audit: AuditLog
    accounts: Accounts
    admin: Administration
    revocations: RevocationStore

    async def close(self) -> None:
        """Close every pooled database and Redis connection."""
        await self.redis.aclose()
        await self.engine.dispose()


def throttle_policy(settings: AuthSettings) -> ThrottlePolicy:
    """The throttle numbers from the settings."""
    return ThrottlePolicy(
        lockout_threshold=settings.lockout_threshold,
        lockout_seconds=settings.lockout_seconds,
        failure_window_seconds=settings.failure_window_seconds,
        backoff_free_failures=settings.backoff_free_failures,
        source_free_failures=settings.source_free_failures,
        backoff_base_seconds=settings.backoff_base_seconds,
        backoff_max_seconds=settings.backoff_max_seconds,
    )


async def build_dependencies(
    settings: AuthSettings, *, clock: Callable[[], float] = time.time
) -> AuthDependencies:
    """Load the secret key, migrate the schema, make sure a signing key exists.

    The secret key file is read first, so that a missing or group/world-readable file stops the
    service before it touches the database. What an operator can cause (that file, Postgres or
    Redis out of reach, a key file that did not seal this database) raises StartupError.
    `clock` is the time TOTP codes are checked against.
    """
    box = load_secret_box(settings.secret_key_file)
    engine = create_engine(
        settings.database_url, schema=settings.db_schema, application_name="streammesh-auth"
    )
    redis = connect_redis(settings.redis_url)
    try:
        store = AuthStore(engine, schema=settings.db_schema)
        keys = KeyRing(
            KeyStore(engine, schema=settings.db_schema), box, overlap_seconds=settings.key_overlap
        )
        with reaching("Postgres", settings.database_url), sealed_with_this_key(settings):
            await store.migrate()
            signing_key = await keys.bootstrap()
        with reaching("Redis", settings.redis_url):
            await redis.ping()
        # Building the hasher computes the dummy hash: one argon2 run, kept off the loop; the
        # deny-list is loaded now rather than by the first registration.
        passwords = await asyncio.to_thread(
            functools.partial(Passwords, max_concurrent=settings.hash_concurrency)
        )
        await asyncio.to_thread(is_common_password, "")
    except BaseException:
        await redis.aclose()
        await engine.dispose()
        raise
    log.info("access tokens are signed with key %s", signing_key.kid)
    tokens = TokenIssuer(
        keys,
        issuer=settings.issuer,
        audience=settings.audience,
        ttl_seconds=settings.access_token_ttl_seconds,
    )
    audit = AuditLog(engine)
    throttle = Throttle(redis, prefix=settings.redis_prefix, policy=throttle_policy(settings))
    sessions = Sessions(
        SessionStore(
            engine,
            refresh_ttl_seconds=settings.refresh_token_ttl_seconds,
            session_max_seconds=settings.session_max_seconds,
        ),
        tokens,
        audit,
    )
    accounts = Accounts(
        store=store,
        passwords=passwords,
        box=box,
        throttle=throttle,
        challenges=Challenges(
            redis, prefix=settings.redis_prefix, ttl_seconds=settings.login_challenge_ttl_seconds
        ),
        sessions=sessions,
        audit=audit,
        default_roles=settings.default_roles,
        totp_issuer=settings.totp_issuer,
        clock=clock,
    )
    admin = Administration(
        accounts=accounts,
        store=store,
        sessions=sessions,
        throttle=throttle,
        keys=keys,
        audit=audit,
        tenants=TenantStore(engine),
    )
    return AuthDependencies(
        engine=engine,
        redis=redis,
        store=store,
        keys=keys,
        tokens=tokens,
        sessions=sessions,
        throttle=throttle,
        audit=audit,
        accounts=accounts,
        admin=admin,
        revocations=RevocationStore(engine),
    )


def create_server(settings: AuthSettings, deps: AuthDependencies) -> MeshServer:
    """Build (not start) the auth server on `settings.port` (0 picks one; see `.port`)."""
    servicer = AuthServicer(
        accounts=deps.accounts,
        sessions=deps.sessions,
        keys=deps.keys,
        admin=deps.admin,
        audit=deps.audit,
        revocations=RevocationFeed(
            deps.revocations,
            retention_seconds=settings.revocation_retention,
            poll_seconds=settings.revocation_poll_seconds,
            heartbeat_seconds=settings.revocation_heartbeat_seconds,
        ),
        trust_domain=settings.trust_domain,
    )
    binding = ServiceBinding(SERVICE, auth_pb2_grpc.add_AuthServiceServicer_to_server, servicer)
    metrics = ServiceMetrics("auth")
    metrics.registry.register(AuthEventsCollector(deps.accounts.events))
    return create_mesh_server(
        settings,
        identity="auth",
        bindings=[binding],
        # Who may call what: the `auth` table of the policy file (streammesh/mesh/policy.toml).
        guard=PeerPolicy.load(settings, "auth"),
        metrics=metrics,
    )


async def run_maintenance(settings: AuthSettings, deps: AuthDependencies) -> None:
    """Forever: scheduled key rotation and retirement, trimming revocations of expired tokens,
    and forgetting long-ended sessions.

    Every replica runs it; the key work happens under an advisory lock with the "is it due"
    check inside, so a rotation happens once however many replicas find it due together.
    """
    last_sweep: float | None = None
    while True:
        raise_if_cancelled()
        try:
            await deps.admin.maintain_keys(settings.key_rotation_days)
            await deps.revocations.trim(settings.revocation_retention)
            if last_sweep is None or time.monotonic() - last_sweep >= SESSION_SWEEP_SECONDS:
                swept = await deps.sessions.sweep(SESSION_RETENTION_SECONDS)
                last_sweep = time.monotonic()
                if swept:
                    log.info("forgot %d ended sessions", swept)
        except Exception:  # a failed round must not end the loop; the next one retries
            log.exception(
                "auth maintenance failed; retrying in %.0fs", settings.maintenance_interval_seconds
            )
        await asyncio.sleep(settings.maintenance_interval_seconds)


async def serve(settings: AuthSettings) -> None:
    """Run one auth replica until SIGTERM/SIGINT, then drain and close the pools."""
    deps = await build_dependencies(settings)
    maintenance = asyncio.create_task(run_maintenance(settings, deps), name="auth-maintenance")
    try:
        mesh = create_server(settings, deps)
        # Logins need both: users and sessions in Postgres, throttle state in Redis.
        mesh.watch_dependencies(
            postgres_check(settings.database_url), redis_check(settings.redis_url)
        )
        await run_until_signalled(mesh, grace=settings.grace_seconds)
    finally:
        await stop_task(maintenance)
        await deps.close()


def main() -> None:
    """Entry point of `python -m services.auth`."""
    run_service("auth", AuthSettings, serve)
