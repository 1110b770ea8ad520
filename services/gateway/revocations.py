"""The revocations auth announces, as this gateway knows them, and the task that follows them.

`RevocationFollower` keeps one AuthService/WatchRevocations stream open (to whichever auth
replica the channel picks), resumes from its cursor after any break, and applies every response
to a `RevocationList`. The list answers the verifier: is this token's session revoked, its
user's token generation, or its tenant's (a disabled tenant)? Each entry is dropped at its `expire_time`, when every token it
concerns has expired anyway, so memory is bounded by what is revoked within one token lifetime.

Every response confirms that the feed is live (auth sends a heartbeat while nothing happens).
When nothing confirmed it for longer than `max_staleness`, and before the first response after
start-up, the gateway cannot know what was revoked meanwhile. Then `FailMode.OPEN` (the
default) accepts authenticated calls, logs a warning and counts each such call in
`accepted_while_stale`: a revocation made meanwhile applies as soon as the feed is back (the
cursor resumes), at the latest when the token expires. `FailMode.CLOSED` refuses them with
UNAVAILABLE and a RetryInfo (the token may be fine, so not UNAUTHENTICATED). Revocations already
known are refused in both modes.

Open is the default because the feed needs auth and its Postgres, and so does every
revocation: when the feed is down, revocations mostly cannot be made either, while closed would
turn an auth or Postgres outage into an outage of publishing, which otherwise needs only ingest
and Redis.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from streammesh.api.auth.v1 import auth_pb2
from streammesh.mesh.errors import StreamMeshError, Unavailable
from streammesh.mesh.logs import LogThrottle
from streammesh.mesh.tasks import raise_if_cancelled, stop_task, wait_event
from streammesh.mesh.tenancy import DEFAULT_TENANT

__all__ = [
    "STALE_RETRY_SECONDS",
    "FailMode",
    "RevocableStream",
    "RevocationFollower",
    "RevocationList",
    "Revoked",
]

log = logging.getLogger(__name__)

STALE_RETRY_SECONDS = 1.0
"""RetryInfo of a call refused because the feed is stale: reconnecting takes about that long."""
_PRUNE_SECONDS = 5.0
_WARN_SECONDS = 10.0
_MIN_IDLE_SECONDS = 1.0


class FailMode(enum.StrEnum):
    """What a stale revocation list does with an otherwise valid token."""

    CLOSED = "closed"
    OPEN = "open"


class Revoked(Exception):
    """The token's session or generation is revoked (the verifier turns it into TokenRejected)."""


@dataclass
class _Entry:
    generation: int
    expires: float
    """Wall-clock seconds (auth's `expire_time`)."""


class RevocationList:
    """Revoked sessions, per-user and per-tenant token generations, and how fresh that
    knowledge is."""

    def __init__(
        self,
        *,
        max_staleness: float,
        fail_mode: FailMode,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_staleness = max_staleness
        self._fail_mode = fail_mode
        self._clock = clock
        self._wall = wall_clock
        self._sessions: dict[str, float] = {}
        self._users: dict[str, _Entry] = {}
        self._tenants: dict[str, _Entry] = {}
        self._confirmed: float | None = None
        self._next_prune = 0.0
        self._stale_warning = LogThrottle(log, interval=_WARN_SECONDS, clock=clock)
        self.live = asyncio.Event()
        """Set once the first response arrived (start-up waits for it)."""
        self.cursor = ""
        """Where the follower resumes."""
        self.accepted_while_stale = 0
        """Calls accepted in fail-open mode while the list was stale."""
        self.snapshots = 0
        """Snapshots received (a resumed stream starts without one)."""

    def __len__(self) -> int:
        return len(self._sessions) + len(self._users) + len(self._tenants)

    def apply(self, response: auth_pb2.WatchRevocationsResponse) -> None:
        """Merge one response. A snapshot is merged too, not swapped in: entries only refuse,
        and each one leaves at its own expiry."""
        for revocation in response.revocations:
            expires = revocation.expire_time.ToNanoseconds() / 1e9
            if revocation.kind == auth_pb2.REVOCATION_KIND_SESSION:
                self._sessions[revocation.subject] = max(
                    expires, self._sessions.get(revocation.subject, 0.0)
                )
            elif revocation.kind == auth_pb2.REVOCATION_KIND_USER_TOKENS:
                _merge(self._users, revocation.subject, revocation.generation, expires)
            elif revocation.kind == auth_pb2.REVOCATION_KIND_TENANT_TOKENS:
                _merge(self._tenants, revocation.subject, revocation.generation, expires)
            else:
                # From an auth newer than this gateway: it cannot be applied, so it is not
                # enforced here (upgrade gateways first); logged loudly rather than guessed at.
                log.error("unknown revocation kind %d from auth; ignored", revocation.kind)
        if response.snapshot:
            self.snapshots += 1
        if response.cursor:
            self.cursor = response.cursor
        self._confirmed = self._clock()
        self.live.set()
        if self._confirmed >= self._next_prune:
            self._prune()

    def revoked(
        self,
        subject: str,
        session_id: str,
        generation: int,
        *,
        tenant: str = DEFAULT_TENANT,
        tenant_generation: int = 0,
    ) -> bool:
        """Whether a token of user `subject`, session `session_id`, token generation
        `generation`, of `tenant` with tenant generation `tenant_generation` is revoked, as
        far as the list knows (staleness aside)."""
        now = self._wall()
        expires = self._sessions.get(session_id)
        if expires is not None and expires >= now:
            return True
        return _below(self._users.get(subject), generation, now) or _below(
            self._tenants.get(tenant), tenant_generation, now
        )

    def check(
        self,
        subject: str,
        session_id: str,
        generation: int,
        *,
        tenant: str = DEFAULT_TENANT,
        tenant_generation: int = 0,
    ) -> None:
        """Raise Revoked for a revoked token; when the list is stale, raise Unavailable
        (fail-closed) or count and warn (fail-open)."""
        if self.revoked(
            subject, session_id, generation, tenant=tenant, tenant_generation=tenant_generation
        ):
            raise Revoked
        staleness = self.staleness()
        if staleness is None:
            return
        if self._fail_mode is FailMode.CLOSED:
            raise Unavailable(
                "auth's revocation feed is unavailable; try again shortly",
                retry_after_seconds=STALE_RETRY_SECONDS,
            )
        self.accepted_while_stale += 1
        self._stale_warning.warning(
            "revocation feed stale (%s); accepting tokens (fail-open), %d calls so far",
            "never received" if staleness == float("inf") else f"{staleness:.1f}s",
            self.accepted_while_stale,
        )

    def staleness(self) -> float | None:
        """Seconds since the feed last confirmed the list (inf before the first response);
        None while it is fresh enough that the exact age does not matter."""
        if self._confirmed is None:
            return float("inf")
        age = self._clock() - self._confirmed
        return age if age > self._max_staleness else None

    def _prune(self) -> None:
        now = self._wall()
        self._sessions = {sid: at for sid, at in self._sessions.items() if at >= now}
        self._users = {sub: entry for sub, entry in self._users.items() if entry.expires >= now}
        self._tenants = {key: entry for key, entry in self._tenants.items() if entry.expires >= now}
        self._next_prune = self._clock() + _PRUNE_SECONDS


def _merge(entries: dict[str, _Entry], subject: str, generation: int, expires: float) -> None:
    """Merge a generation revocation: the highest generation and the latest expiry win."""
    entry = entries.get(subject)
    if entry is None:
        entries[subject] = _Entry(generation, expires)
    else:
        entry.generation = max(entry.generation, generation)
        entry.expires = max(entry.expires, expires)


def _below(entry: _Entry | None, generation: int, now: float) -> bool:
    return entry is not None and generation < entry.generation and entry.expires >= now


T = TypeVar("T")


class RevocableStream:
    """The requests of one client stream, for as long as its token is not revoked.

    A token is checked once, when the stream opens, and a producer's stream can outlive it. The
    requests are passed through this, which checks the list before each one: once the token is
    revoked the requests end as if the client had half-closed, so whatever was already
    forwarded is still acknowledged and nothing more is; the handler then ends the stream with
    the refusal a new call would get (`revoked` says so).
    """

    def __init__(
        self,
        revocations: RevocationList,
        *,
        subject: str,
        session_id: str,
        generation: int,
        tenant: str = DEFAULT_TENANT,
        tenant_generation: int = 0,
    ) -> None:
        self._list = revocations
        self._token = (subject, session_id, generation)
        self._tenant = (tenant, tenant_generation)
        self.revoked = False

    async def requests(self, requests: AsyncIterator[T]) -> AsyncIterator[T]:
        """`requests` until the token is revoked."""
        async for request in requests:
            tenant, tenant_generation = self._tenant
            if self._list.revoked(*self._token, tenant=tenant, tenant_generation=tenant_generation):
                self.revoked = True
                log.info("stream of session %s ended: its token was revoked", self._token[1])
                return
            yield request


Watch = Callable[[str], AsyncIterator[auth_pb2.WatchRevocationsResponse]]


class RevocationFollower:
    """The background task that keeps a RevocationList up to date; `start()` then `close()`."""

    def __init__(
        self,
        watch: Watch,
        revocations: RevocationList,
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 1.0,
    ) -> None:
        self._watch = watch
        self._list = revocations
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        """Streams opened so far (a reconnect after auth restarted counts one more)."""

    def start(self) -> None:
        """Start following (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway-revocations")

    async def wait_live(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the first response; True once it arrived."""
        return await wait_event(self._list.live, timeout)

    async def close(self) -> None:
        """Stop following."""
        if self._task is not None:
            await stop_task(self._task)
            self._task = None

    async def _run(self) -> None:
        backoff = self._backoff_initial
        failing = False
        while True:
            raise_if_cancelled()
            self.connects += 1
            try:
                async for _ in self._follow():
                    backoff = self._backoff_initial  # a response arrived: the feed works
                    if failing:
                        failing = False
                        log.info("revocation feed is back")
            except (grpc.aio.AioRpcError, StreamMeshError, TimeoutError) as error:
                # One warning per outage, not one per reconnection attempt.
                log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "revocation feed interrupted (%s); reconnecting",
                    _describe(error),
                )
                failing = True
            else:
                log.info("revocation feed ended by auth; reconnecting")
            # The list stays as it is: the staleness bound runs from its last confirmation.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _follow(self) -> AsyncIterator[None]:
        """Apply responses of one stream; a stream that stays silent for three heartbeats is
        dead even if its connection is not (a hung replica), so it is dropped."""
        stream = self._watch(self._list.cursor)
        idle = _MIN_IDLE_SECONDS * 5  # until the first response says the heartbeat
        iterator = aiter(stream)
        try:
            while True:
                async with asyncio.timeout(idle):
                    response = await anext(iterator)
                self._list.apply(response)
                heartbeat = response.heartbeat.ToTimedelta() / dt.timedelta(seconds=1)
                idle = max(3 * heartbeat, _MIN_IDLE_SECONDS)
                yield None
        except StopAsyncIteration:
            return
        finally:
            closing = getattr(stream, "aclose", None)
            if closing is not None:
                await closing()


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, TimeoutError):
        return "no heartbeat"
    return str(error)
