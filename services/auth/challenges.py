"""Login challenges: what StartLogin hands out after a correct password, for CompleteLogin.

A challenge is `smc_` + 32 random bytes (url-safe base64). Redis holds only its SHA-256, under
`<prefix>challenge:<hex>`, with the user it was issued for and an expiry (PX), so every replica
can complete it and none keeps it in memory. It is single-use: CompleteLogin takes it with GETDEL
once the throttle admitted the attempt, whatever the outcome, so a wrong code costs the caller a
new password step, and two calls with the same challenge cannot both see it. (A call the throttle
refuses only looks at it, so the caller can retry with it after the delay.)
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from streammesh.mesh.tenancy import DEFAULT_TENANT

__all__ = ["CHALLENGE_PREFIX", "Challenge", "Challenges"]

CHALLENGE_PREFIX = "smc_"
_FORMAT = re.compile(rf"{CHALLENGE_PREFIX}[A-Za-z0-9_-]{{43}}")


@dataclass(frozen=True)
class Challenge:
    """Whom a challenge was issued to."""

    user_id: uuid.UUID
    username: str
    tenant: str = DEFAULT_TENANT


class Challenges:
    """Issues and takes single-use challenges, kept in Redis for `ttl_seconds`."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str, ttl_seconds: float) -> None:
        self._redis = redis
        self._prefix = f"{prefix}challenge:"
        self._ttl_ms = max(1, round(ttl_seconds * 1000))

    @property
    def ttl_seconds(self) -> float:
        """How long an issued challenge can be answered."""
        return self._ttl_ms / 1000

    async def issue(self, user_id: uuid.UUID, username: str, tenant: str = DEFAULT_TENANT) -> str:
        """A fresh challenge for this user."""
        challenge = CHALLENGE_PREFIX + secrets.token_urlsafe(32)
        value = json.dumps({"user_id": str(user_id), "username": username, "tenant": tenant})
        await self._redis.set(self._key(challenge), value, px=self._ttl_ms)
        return challenge

    async def peek(self, challenge: str) -> Challenge | None:
        """The challenge's user if it is still open (issued, not expired, not taken); it stays
        open."""
        if not _FORMAT.fullmatch(challenge):
            return None
        return _decode(await self._redis.get(self._key(challenge)))

    async def take(self, challenge: str) -> Challenge | None:
        """The challenge's user if it was issued, has not expired and was not taken before;
        it can never be taken again."""
        if not _FORMAT.fullmatch(challenge):
            return None
        return _decode(await self._redis.getdel(self._key(challenge)))

    def _key(self, challenge: str) -> str:
        return self._prefix + hashlib.sha256(challenge.encode()).hexdigest()


def _decode(raw: bytes | str | None) -> Challenge | None:
    if raw is None:
        return None
    data = json.loads(raw)
    # Challenges issued before tenants existed name none: theirs is the default tenant.
    return Challenge(
        user_id=uuid.UUID(data["user_id"]),
        username=str(data["username"]),
        tenant=str(data.get("tenant", DEFAULT_TENANT)),
    )
