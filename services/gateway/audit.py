"""The edge audit trail: refused calls, and the admin calls the gateway serves itself (dead
letters), reported to auth's audit log off the request path.

`record()` never waits and never fails: events go into a bounded in-memory queue that one
background task drains into auth's RecordAuditEvent. When the queue is full, or auth refuses or
cannot be reached, the event is dropped, counted in `dropped`, and a warning is logged at most
once per `warn_interval` seconds. Events carry reason codes, methods and addresses, never a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping

from streammesh.api.auth.v1 import auth_pb2

__all__ = [
    "ACCESS_DENIED",
    "DENIED",
    "FAILURE",
    "SUCCESS",
    "TOKEN_INVALID",
    "AuditTrail",
    "admin_action",
    "refusal",
]

log = logging.getLogger(__name__)

ACCESS_DENIED = "access_denied"
"""Action of a call refused for its roles (or a method the gateway does not expose)."""
TOKEN_INVALID = "token_invalid"  # noqa: S105 - an action name, not a secret
"""Action of a call refused for its access token."""
DENIED = "denied"
SUCCESS = "success"
FAILURE = "failure"

Send = Callable[[auth_pb2.AuditEvent], Awaitable[None]]


def refusal(
    *,
    action: str,
    reason: str,
    actor: str,
    source: str,
    details: Mapping[str, str],
    tenant: str = "",
) -> auth_pb2.AuditEvent:
    """An audit event for a call the gateway refused (in the caller's tenant when its token
    was verified; a refusal before that belongs to no tenant)."""
    event = auth_pb2.AuditEvent(
        tenant=tenant,
        event_id=str(uuid.uuid4()),
        actor=actor,
        action=action,
        outcome=DENIED,
        reason=reason,
        source=source,
        details=dict(details),
    )
    event.time.GetCurrentTime()
    return event


def admin_action(
    *,
    action: str,
    outcome: str,
    reason: str,
    actor: str,
    source: str,
    details: Mapping[str, str],
    tenant: str = "",
) -> auth_pb2.AuditEvent:
    """An audit event for an admin call the gateway served itself (outcome success/failure)."""
    event = auth_pb2.AuditEvent(
        tenant=tenant,
        event_id=str(uuid.uuid4()),
        actor=actor,
        action=action,
        outcome=outcome,
        reason=reason,
        source=source,
        details=dict(details),
    )
    event.time.GetCurrentTime()
    return event


class AuditTrail:
    """A bounded queue of audit events and the task that sends them to auth."""

    def __init__(
        self,
        send: Send,
        *,
        capacity: int,
        warn_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._queue: asyncio.Queue[auth_pb2.AuditEvent] = asyncio.Queue(maxsize=capacity)
        self._warn_interval = warn_interval
        self._clock = clock
        self._last_warning: float | None = None
        self._worker: asyncio.Task[None] | None = None
        self.dropped = 0
        """Events lost because the queue was full or auth did not take them."""
        self.sent = 0
        """Events auth acknowledged."""

    def record(self, event: auth_pb2.AuditEvent) -> None:
        """Queue `event` for auth without waiting; drop it (counted) when the queue is full."""
        self._ensure_worker()
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._drop("the queue is full")

    async def close(self, timeout: float) -> None:
        """Give queued events up to `timeout` seconds to reach auth, then stop the sender."""
        if self._worker is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None
        left = self._queue.qsize()
        if left:
            self._drop_count(left, "the gateway is stopping")

    def _ensure_worker(self) -> None:
        # Started on first use, from the request's event loop: the server factory has no hook.
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._drain(), name="gateway-audit"
            )

    async def _drain(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._send(event)
            except asyncio.CancelledError:
                self._drop("the gateway is stopping")
                raise
            except Exception as error:  # any failure of auth must cost one event, not the task
                self._drop(f"auth did not take it ({type(error).__name__})")
            else:
                self.sent += 1
            finally:
                self._queue.task_done()

    def _drop(self, why: str) -> None:
        self._drop_count(1, why)

    def _drop_count(self, count: int, why: str) -> None:
        self.dropped += count
        now = self._clock()
        if self._last_warning is None or now - self._last_warning >= self._warn_interval:
            self._last_warning = now
            log.warning("audit event dropped: %s (%d dropped since start)", why, self.dropped)
