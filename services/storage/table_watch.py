"""The live feeds of one storage replica (services.storage.live_feed), one per tailed table and
tenant, and what wakes them.

Wake-ups: storage writes every row that is tailed (StoreEvents, StoreEngineOutputs), so its
write path says when it committed rows of a table for a tenant (`changed`). That wakes this
replica's feeds at once, and is passed to the other replicas with a NOTIFY on the table's
channel (payload: the tenant), which this replica's feeds LISTEN to on one pooled connection
while any feed runs. The NOTIFY is sent after the writer's commit, in a transaction of its own,
and coalesced (one statement, at most every 20 ms, for every tenant changed since the last),
because a NOTIFY inside the writing transaction takes Postgres' notification queue lock at
commit and so serialises every writer's commit. A feed also polls every `poll_seconds`: for
rows written outside storage, a notification lost while the listening connection was down, and
rows that were not settled yet when their commit woke it (an older writer still running: its
own commit wakes the feed again when it is storage's).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import asyncpg

from services.storage.live_feed import Feed, Read

__all__ = ["Table", "TableWatch"]

Table = Literal["events", "alerts", "window_results"]
TABLES: tuple[Table, ...] = ("events", "alerts", "window_results")

log = logging.getLogger(__name__)

_NOTIFY_SPACING = 0.02
"""Seconds between two NOTIFY statements of a replica, at least: at most 50 a second whatever
the write rate, for at most that much more latency on the other replicas."""


class TableWatch:
    """Feeds by (table, tenant), started with their first subscriber and stopped after their
    last; the LISTEN connection while any runs; the coalesced NOTIFY of local writes."""

    def __init__(self, pool: asyncpg.Pool, *, schema: str, poll_seconds: float) -> None:
        self._pool = pool
        # Postgres truncates channel names at 63 bytes, and a schema name alone may be 63: a
        # short digest of the schema keeps every replica of one store on the same channels.
        digest = hashlib.sha256(schema.encode()).hexdigest()[:16]
        self._channels = {table: f"sm_{digest}_{table}" for table in TABLES}
        self._tables = {channel: table for table, channel in self._channels.items()}
        self._poll_seconds = poll_seconds
        self._feeds: dict[tuple[Table, str], Feed] = {}
        self._listener: asyncio.Task[None] | None = None
        self._pending: set[tuple[Table, str]] = set()
        self._sender: asyncio.Task[None] | None = None
        # Our own notifications carry this replica's id (backend pids are reused by the pool's
        # other replicas' connections, so a pid cannot tell a notification's sender).
        self._replica = uuid.uuid4().hex[:12]
        self.notifications = 0
        """Notifications received from other connections (for the tests)."""

    def feed(
        self, table: Table, tenant: str, read: Read, end: Callable[[str], Awaitable[int]]
    ) -> Feed:
        """The running feed of `table` for `tenant`, started now when there is none."""
        found = self._feeds.get((table, tenant))
        if found is None:
            found = Feed(tenant, read, end, self._poll_seconds, self._stopped(table))
            self._feeds[(table, tenant)] = found
            if self._listener is None:
                self._listener = asyncio.create_task(self._listen(), name="table watch")
        return found

    def _stopped(self, table: Table) -> Callable[[Feed], None]:
        def stopped(feed: Feed) -> None:
            if self._feeds.get((table, feed.tenant)) is feed:
                del self._feeds[(table, feed.tenant)]
            if not self._feeds and self._listener is not None:
                self._listener.cancel()
                self._listener = None

        return stopped

    def changed(self, table: Table, tenants: Iterable[str]) -> None:
        """Storage committed rows of `table` for `tenants`: wake the feeds, tell the replicas."""
        for tenant in set(tenants):
            self._wake(table, tenant)
            self._pending.add((table, tenant))
        if self._pending and self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="table watch notify")

    def _wake(self, table: Table, tenant: str) -> None:
        found = self._feeds.get((table, tenant))
        if found is not None:
            found.wake()

    async def _send(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, set()
                channels = [self._channels[table] for table, _ in batch]
                tenants = [f"{self._replica}/{tenant}" for _, tenant in batch]
                async with self._pool.acquire(timeout=5) as conn:
                    await conn.execute(
                        "SELECT pg_notify(c, t) FROM unnest($1::text[], $2::text[]) AS n(c, t)",
                        channels,
                        tenants,
                    )
                await asyncio.sleep(_NOTIFY_SPACING)  # gather what commits meanwhile
        except Exception as error:  # the other replicas' feeds poll; no write fails for it
            log.warning("could not notify other storage replicas of new rows: %s", error)
            self._pending.clear()
        finally:
            self._sender = None

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        table = self._tables.get(channel)
        sender, _, tenant = payload.partition("/")
        if table is None or not tenant or sender == self._replica:
            return  # our own notification: the feed was woken when the rows were committed
        self.notifications += 1
        self._wake(table, tenant)

    async def _listen(self) -> None:
        """LISTEN on the tables' channels while feeds run; again after a lost connection."""
        while True:
            try:
                async with self._pool.acquire(timeout=5) as conn:
                    lost = asyncio.Event()
                    conn.add_termination_listener(lambda _, lost=lost: lost.set())
                    try:
                        for channel in self._channels.values():
                            await conn.add_listener(channel, self._notified)
                        for feed in self._feeds.values():
                            feed.wake()  # what was notified before the LISTEN took effect
                        await lost.wait()
                    finally:
                        with contextlib.suppress(Exception):
                            for channel in self._channels.values():
                                await conn.remove_listener(channel, self._notified)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("storage could not LISTEN for new rows (feeds poll): %s", error)
            await asyncio.sleep(self._poll_seconds)
