"""The one way services open Redis: bounded timeouts and a short retry on dropped connections.

After a Redis restart every pooled connection is dead; without a retry the first command on
each fails (an UNAVAILABLE the caller did nothing to deserve). Commands are retried at most
three times with a small backoff, which is safe for what the services send: XADD duplicates are
absorbed by the idempotent store, XACK and the lease scripts are idempotent or compare-and-set.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["connect_redis"]


def connect_redis(
    url: str, *, timeout_seconds: float = 5.0, longest_block_ms: int = 0
) -> aioredis.Redis:
    """A client whose commands fail after `timeout_seconds` (plus the longest blocking read the
    caller issues, so XREADGROUP BLOCK is not cut short) instead of hanging on a half-open
    connection."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_seconds,
        socket_timeout=timeout_seconds + longest_block_ms / 1000,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
    )
