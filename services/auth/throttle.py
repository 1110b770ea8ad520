"""Failed-attempt throttling and account lockout, shared by every auth replica through Redis.

Two counters are kept: one per account (the canonical username, whether or not such a user
exists, so the answers cannot tell unknown users apart) and one per source (the client address
the gateway reports; IPv6 by /64 so one host cannot rotate through its own prefix). Wrong
passwords and wrong second factors (TOTP or recovery codes) both count, and so does every
registration (`spend_source`: only the source counter; registering reveals whether a username is
taken, so it is an enumeration oracle that must cost the source as a failure does).

* Delay: after more than the free number of failures, each failure makes the account (or the
  source) wait `base * 2^(failures - free - 1)` seconds, capped, before its next attempt. An attempt
  that comes sooner is refused at once with RESOURCE_EXHAUSTED and RetryInfo (refused, not slept:
  a sleeping handler would hold a connection and a task per attempt, which an attacker controls).
  Both login steps check the delays: whoever knows the password can collect many challenges, and
  each second-factor guess must still wait as long as the previous failures demand.
* Lock: `lockout_threshold` consecutive failures of one account lock it for `lockout_seconds`;
  the counter starts again from zero afterwards. A successful login (both factors) resets the
  account's counter; the source counter only expires (logging in to one's own account must not
  clear the record of guessing at others).

Counting is pessimistic: `admit` adds the attempt to both counters before the credentials are
checked, and a correct password takes it back (`release`). So a burst of concurrent guesses
cannot slip past the threshold while the first ones are still being verified: once `threshold`
attempts are counted, further ones are refused until those are settled.

All state changes are Lua scripts, atomic in Redis; every key expires by itself.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

__all__ = ["Admission", "FailureResult", "Throttle", "ThrottlePolicy", "Verdict", "source_key"]


class Verdict(enum.Enum):
    """What `admit` decided."""

    ALLOWED = "allowed"
    LOCKED = "locked"
    WAIT = "wait"


@dataclass(frozen=True)
class Admission:
    """An admission decision; `retry_after` (seconds) is set for WAIT."""

    verdict: Verdict
    retry_after: float = 0.0


@dataclass(frozen=True)
class FailureResult:
    """The account's consecutive failures after this one, and whether this one locked it."""

    failures: int
    locked_now: bool


@dataclass(frozen=True)
class ThrottlePolicy:
    """The numbers of the algorithm (see the module docstring)."""

    lockout_threshold: int = 10
    """Consecutive failures that lock an account."""
    lockout_seconds: float = 900
    """How long a lock lasts."""
    failure_window_seconds: float = 86_400
    """A counter is forgotten this long after its last change."""
    backoff_free_failures: int = 3
    """Failures of one account before delays start."""
    source_free_failures: int = 10
    """Failures (and registrations) from one source before delays start."""
    backoff_base_seconds: float = 1.0
    """The first delay; it doubles with each further failure."""
    backoff_max_seconds: float = 300
    """The cap on one delay."""


def source_key(source: str) -> str:
    """The throttling bucket of a client address: the IPv4 address, the IPv6 /64, or (for
    anything else) the text itself. Hashed, so any text makes a safe, bounded Redis key."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        bucket = source
    else:
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                bucket = str(address.ipv4_mapped)
            else:
                bucket = str(ipaddress.IPv6Network(f"{address}/64", strict=False))
        else:
            bucket = str(address)
    return hashlib.sha256(bucket.encode()).hexdigest()[:32]


# KEYS: account count, account wait, account lock, source count, source wait
# ARGV: threshold, window ms
_ADMIT = """
local lock = redis.call('PTTL', KEYS[3])
if lock > 0 then return {1, lock} end
local wait = math.max(redis.call('PTTL', KEYS[2]), redis.call('PTTL', KEYS[5]))
if wait > 0 then return {2, wait} end
local n = redis.call('INCR', KEYS[1])
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return {2, 1000}
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return {0, 0}
"""

# The delay (ms) after `failures` failures of which `free` cost nothing.
_DELAY = """
local function delay(failures, free, base, cap)
  if failures <= free then return 0 end
  return math.floor(math.min(tonumber(base) * 2 ^ (failures - free - 1), tonumber(cap)))
end
"""

# KEYS: as for _ADMIT
# ARGV: threshold, lock ms, window ms, account free, source free, base ms, max ms
_FAIL = (
    _DELAY
    + """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local locked = 0
if n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
  redis.call('DECRBY', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  locked = 1
else
  local wait = delay(n, tonumber(ARGV[4]), ARGV[6], ARGV[7])
  if wait > 0 then redis.call('SET', KEYS[2], '1', 'PX', wait) end
end
local m = tonumber(redis.call('GET', KEYS[4]) or '0')
local source_wait = delay(m, tonumber(ARGV[5]), ARGV[6], ARGV[7])
if source_wait > 0 then redis.call('SET', KEYS[5], '1', 'PX', source_wait) end
return {n, locked}
"""
)

# Count one attempt that costs the source as a failure, or refuse it while the source waits.
# Admission and the new delay in one step, so a concurrent burst cannot slip past the delay.
# KEYS: source count, source wait. ARGV: window ms, source free, base ms, max ms
_SPEND_SOURCE = (
    _DELAY
    + """
local wait = redis.call('PTTL', KEYS[2])
if wait > 0 then return {2, wait} end
local m = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local source_wait = delay(m, tonumber(ARGV[2]), ARGV[3], ARGV[4])
if source_wait > 0 then redis.call('SET', KEYS[2], '1', 'PX', source_wait) end
return {0, 0}
"""
)

# Take back what `admit` counted. KEYS: account count, source count. ARGV: reset account (0/1)
_RELEASE = """
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
elseif tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then
  redis.call('DECR', KEYS[1])
end
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
return 0
"""


class Throttle:
    """The throttle and lockout state of all replicas, in Redis under `prefix`."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str, policy: ThrottlePolicy) -> None:
        self._redis = redis
        self._prefix = f"{prefix}throttle:"
        self._policy = policy
        self._admit = redis.register_script(_ADMIT)
        self._fail = redis.register_script(_FAIL)
        self._release = redis.register_script(_RELEASE)
        self._spend_source = redis.register_script(_SPEND_SOURCE)

    def _keys(self, account: str, source: str) -> list[str]:
        acct = f"{self._prefix}acct:{account}:"
        return [acct + "n", acct + "wait", acct + "lock", *self._source_keys(source)]

    def _source_keys(self, source: str) -> list[str]:
        src = f"{self._prefix}src:{source_key(source)}:"
        return [src + "n", src + "wait"]

    async def admit(self, account: str, source: str) -> Admission:
        """Count an attempt on `account` from `source`, or refuse it (locked, or too soon)."""
        verdict, millis = await self._call(
            self._admit,
            self._keys(account, source),
            [self._policy.lockout_threshold, self._ms(self._window)],
        )
        return _admission(verdict, millis)

    async def spend_source(self, source: str) -> Admission:
        """Count an attempt from `source` as one of its failures, whatever its outcome (a
        registration), or refuse it while the source has to wait. Never LOCKED."""
        policy = self._policy
        verdict, millis = await self._call(
            self._spend_source,
            self._source_keys(source),
            [
                self._ms(self._window),
                policy.source_free_failures,
                round(policy.backoff_base_seconds * 1000),
                round(policy.backoff_max_seconds * 1000),
            ],
        )
        return _admission(verdict, millis)

    async def failed(self, account: str, source: str) -> FailureResult:
        """The admitted attempt failed: set the delays, and lock the account at the threshold."""
        policy = self._policy
        failures, locked = await self._call(
            self._fail,
            self._keys(account, source),
            [
                policy.lockout_threshold,
                self._ms(policy.lockout_seconds),
                self._ms(self._window),
                policy.backoff_free_failures,
                policy.source_free_failures,
                round(policy.backoff_base_seconds * 1000),
                round(policy.backoff_max_seconds * 1000),
            ],
        )
        return FailureResult(failures=failures, locked_now=bool(locked))

    async def release(self, account: str, source: str) -> None:
        """The admitted attempt was not a failure (a correct password): take it back."""
        keys = self._keys(account, source)
        await self._release(keys=[keys[0], keys[3]], args=[0])

    async def succeeded(self, account: str, source: str) -> None:
        """A complete login: the account's consecutive failures start again from zero."""
        keys = self._keys(account, source)
        await self._release(keys=[keys[0], keys[3]], args=[1])

    async def unlock(self, account: str) -> None:
        """Lift a lock and clear the account's counter and delay."""
        acct = f"{self._prefix}acct:{account}:"
        await self._redis.delete(acct + "n", acct + "wait", acct + "lock")

    async def lock_remaining(self, accounts: Sequence[str]) -> list[float | None]:
        """Seconds each account stays locked, or None when it is not locked."""
        if not accounts:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for account in accounts:
                pipe.pttl(f"{self._prefix}acct:{account}:lock")
            results: list[int] = await pipe.execute()
        return [millis / 1000 if millis > 0 else None for millis in results]

    @property
    def _window(self) -> float:
        return self._policy.failure_window_seconds

    @staticmethod
    def _ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    @staticmethod
    async def _call(script: Any, keys: list[str], args: list[int]) -> tuple[int, int]:
        first, second = await script(keys=keys, args=args)
        return int(first), int(second)


def _admission(verdict: int, millis: int) -> Admission:
    if verdict == 1:
        return Admission(Verdict.LOCKED)
    if verdict == 2:
        return Admission(Verdict.WAIT, retry_after=millis / 1000)
    return Admission(Verdict.ALLOWED)
