"""Concurrent subscriptions per principal counted across every storage replica, in Postgres
(migration 0015): a lease row per running subscription, renewed by its replica, deleted when it
ends, and no longer counted past its expiry when its replica died without deleting it.

Why Postgres and not Redis: storage owns Postgres only (its replicas share it already), and a
subscription is a Postgres reader anyway; the cost is two short statements when a subscription
starts and one when it ends, plus one renewal statement per replica every ttl/3 for all its
leases. A replica that dies holds its principals' places for at most `ttl_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg

from services.storage.store import outage_is_unavailable
from streammesh.mesh.errors import ResourceExhausted
from streammesh.mesh.paging import Principal

__all__ = ["SubscriptionLeases"]

log = logging.getLogger(__name__)

# The advisory lock serialises admissions of one principal (over every replica). It is taken
# in a statement of its own: the count's statement must take its snapshot after the lock, so
# that it sees the lease of an admission that held the lock before.
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('subscriptions'), hashtext($1 || '/' || $2))"
_ADMIT = """
INSERT INTO subscription_leases (lease_id, tenant, principal, expires_at)
SELECT $3, $1, $2, now() + make_interval(secs => $5)
WHERE (
    SELECT count(*) FROM subscription_leases
    WHERE tenant = $1 AND principal = $2 AND expires_at > now()
) < $4
RETURNING lease_id
"""
_RENEW = (
    "UPDATE subscription_leases SET expires_at = now() + make_interval(secs => $2)"
    " WHERE lease_id = ANY($1::uuid[])"
)
_RELEASE = "DELETE FROM subscription_leases WHERE lease_id = $1"
_SWEEP = "DELETE FROM subscription_leases WHERE expires_at < now() - interval '1 hour'"


class SubscriptionLeases:
    """The leases of this replica's subscriptions, and their renewal while any is held."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_seconds: float = 30.0) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._held: set[uuid.UUID] = set()
        self._renewal: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def held(self, principal: Principal, limit: int) -> AsyncIterator[None]:
        """A lease of `principal` while inside; RESOURCE_EXHAUSTED when it holds `limit`
        subscriptions on all replicas together."""
        lease = uuid.uuid4()
        async with (
            outage_is_unavailable("subscription admission"),
            self._pool.acquire(timeout=5) as conn,
            conn.transaction(isolation="read_committed"),
        ):
            await conn.execute(_LOCK, principal.tenant, principal.subject)
            got = await conn.fetchval(
                _ADMIT, principal.tenant, principal.subject, lease, limit, self._ttl
            )
        if got is None:
            raise ResourceExhausted(
                f"at most {limit} concurrent subscriptions per user; close one first",
                retry_after_seconds=1.0,
            )
        self._held.add(lease)
        if self._renewal is None:
            self._renewal = asyncio.create_task(self._renew(), name="subscription leases")
        try:
            yield
        finally:
            self._held.discard(lease)
            if not self._held and self._renewal is not None:
                self._renewal.cancel()
                self._renewal = None
            try:
                async with self._pool.acquire(timeout=5) as conn:
                    await conn.execute(_RELEASE, lease)
            except Exception as error:  # it expires after ttl_seconds
                log.warning("could not release a subscription lease: %s", error)

    async def _renew(self) -> None:
        try:
            while self._held:
                await asyncio.sleep(self._ttl / 3)
                try:
                    async with self._pool.acquire(timeout=5) as conn:
                        await conn.execute(_RENEW, list(self._held), self._ttl)
                        await conn.execute(_SWEEP)
                except Exception as error:  # retried at the next turn, before the expiry
                    log.warning("could not renew subscription leases: %s", error)
        finally:
            if self._renewal is asyncio.current_task():
                self._renewal = None
