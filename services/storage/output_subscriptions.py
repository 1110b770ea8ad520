"""SubscribeAlerts and SubscribeWindowResults: live tails of one tenant's engine outputs in
record order, resumable.

Neither listing order is one to tail: alerts are listed by the last causing event's time, and a
lagging partition records an alert about older events after a newer alert; window results by
window start. Nor are their deterministic identities (they make a redelivered batch write
nothing twice). Migration 0013 gives both tables what events have: seq from an identity (CACHE
1) and store_time read after it, and the tail applies the events' argument unchanged
(services.storage.queries.PAGING_GUARANTEE, with the horizon taken over writers of the table):
a row is sent only once its store_time is before the start of every transaction still writing
the table, so no row with a lower seq can commit after the cursor passed it. A row whose insert
conflicts (a replay) draws a seq and writes nothing: a gap, never a repeat. The rounds, limits,
heartbeats, shared feeds (one per table and tenant, which hands each tail the rows of its rule
or window) and buffers are SubscribeEvents' (services.storage.subscriptions).

Resume tokens are the listings' unsigned position tokens, bound to the tail, the tenant and the
rule or window filter: forging one only moves the caller's own cursor over its own tenant's
outputs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Row, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import TextClause

from services.storage import engine_outputs, registry
from services.storage.engine_output_store import AlertRow, WindowResultRow
from services.storage.live_feed import BufferMetrics, Entry, Feed
from services.storage.queries import horizon_sql
from services.storage.store import outage_is_unavailable
from services.storage.subscriptions import Live, Round, TailAdmissions, follow, resume_refusal
from services.storage.table_watch import TableWatch
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.paging import Principal

__all__ = ["OutputSubscriptions"]


@dataclass(frozen=True)
class _Table:
    """One tailed table: its horizon, the round's and the end's statements, and the message of
    a row (past its first two columns, seq and store_time)."""

    name: Literal["alerts", "window_results"]
    filtered: str
    horizon: TextClause
    rows: TextClause
    end: TextClause
    message: Callable[[Row[Any]], Any]


def _table(
    name: Literal["alerts", "window_results"],
    columns: str,
    filtered: str,
    message: Callable[[Row[Any]], Any],
) -> _Table:
    return _Table(
        name,
        filtered,
        text(f"SELECT {horizon_sql(name)}"),
        text(
            f"SELECT seq, store_time, {columns} FROM {name}"  # noqa: S608 (fixed terms)
            " WHERE tenant = :tenant AND seq > :after"
            f" AND (CAST(:only AS text) = '' OR {filtered} = :only) ORDER BY seq LIMIT :limit"
        ),
        text(
            f"SELECT seq FROM {name} WHERE tenant = :tenant"  # noqa: S608 (fixed terms)
            " AND store_time < :horizon ORDER BY seq DESC LIMIT 1"
        ),
        message,
    )


# The listings' columns (engine_output_store), so the listings' row types and messages serve.
_ALERTS = _table(
    "alerts",
    "alert_id, tenant, rule_id, rule_version, rule_kind, key, first_event_nanos,"
    " last_event_nanos, event_ids, detail::text AS detail, created_at",
    "rule_id",
    lambda row: engine_outputs.alert_message(AlertRow(*tuple(row)[2:])),
)
_RESULTS = _table(
    "window_results",
    "tenant, window_id, window_version, partition, group_key, start_nanos, end_nanos, revision,"
    ' "values"::text AS values, watermark_nanos, retracted, emitted_at',
    "window_id",
    lambda row: engine_outputs.result_message(WindowResultRow(*tuple(row)[2:])),
)


class OutputSubscriptions:
    """The SubscribeAlerts and SubscribeWindowResults handlers' logic over storage's engine."""

    def __init__(
        self,
        engine: AsyncEngine,
        admissions: TailAdmissions,
        watch: TableWatch,
        metrics: BufferMetrics,
    ) -> None:
        self._engine = engine
        self._admissions = admissions
        self._watch = watch
        self._metrics = metrics

    async def _settled(self, table: _Table, tenant: str, only: str, after: int) -> Any:
        """The settled rows after `after` (of `only` unless empty), at most a batch, and
        whether more may follow."""
        limit = self._admissions.settings.batch_events
        arguments = {"tenant": tenant, "after": after, "only": only, "limit": limit + 1}
        async with outage_is_unavailable(f"{table.name} tail"), self._engine.connect() as conn:
            # Read committed: the rows' statement must see every commit the horizon's saw end.
            conn = await conn.execution_options(isolation_level="READ COMMITTED")
            horizon = (await conn.execute(table.horizon)).scalar_one()
            rows = (await conn.execute(table.rows, arguments)).all()
        settled = []
        for row in rows[:limit]:
            if row.store_time >= horizon:
                break  # stop, not skip: store_time does not grow with seq across transactions
            settled.append(row)
        return settled, len(rows) > len(settled)

    async def _round(self, table: _Table, tenant: str, only: str, after: int) -> Round[Any]:
        settled, more = await self._settled(table, tenant, only, after)
        last = settled[-1].seq if settled else after
        return Round([(row.seq, table.message(row)) for row in settled], last, more)

    async def _feed_round(
        self, table: _Table, tenant: str, after: int
    ) -> tuple[list[Entry[Any, Any]], int, bool]:
        settled, more = await self._settled(table, tenant, "", after)
        entries = []
        for row in settled:
            item = table.message(row)
            entries.append(Entry.of(row.seq, row, item))
        return entries, (settled[-1].seq if settled else after), more

    def _feed(self, table: _Table, tenant: str) -> Feed:
        async def read(
            tenant: str, after: int, filters: tuple[Any, ...]
        ) -> tuple[list[Entry[Any, Any]], int, bool]:
            return await self._feed_round(table, tenant, after)  # rule or window: in Python

        async def end(tenant: str) -> int:
            return await self._end(table, tenant)

        return self._watch.feed(table.name, tenant, read, end)

    async def _end(self, table: _Table, tenant: str) -> int:
        async with outage_is_unavailable(f"{table.name} tail"), self._engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="READ COMMITTED")
            horizon = (await conn.execute(table.horizon)).scalar_one()
            found = (await conn.execute(table.end, {"tenant": tenant, "horizon": horizon})).scalar()
        return 0 if found is None else int(found)

    async def _tail(
        self,
        table: _Table,
        request: pb.SubscribeAlertsRequest | pb.SubscribeWindowResultsRequest,
        only: str,
        message: Callable[[list[Any], str, bool], Any],
    ) -> AsyncIterator[Any]:
        tenant = registry.checked_tenant(request.tenant)
        scope = (f"{table.name}_tail", tenant, only)
        try:
            opened = engine_outputs.open_position(request.resume_token, (int,), *scope)
        except InvalidArgument as error:
            raise resume_refusal(error) from None
        settings = self._admissions.settings
        async with self._admissions.admitted(Principal(tenant, request.principal)):
            after = 0 if opened is None else max(0, int(opened[0]))
            if opened is None and request.start_at_end:
                after = await self._end(table, tenant)

            def token(seq: int) -> str:
                return engine_outputs.position_token([seq], *scope)

            async def read(after: int) -> Round[Any]:
                return await self._round(table, tenant, only, after)

            def match(row: Row[Any]) -> bool | None:
                return not only or getattr(row, table.filtered) == only

            live: Live[Row[Any], Any] | None = None
            if settings.shared_feeds:
                live = Live(lambda: self._feed(table, tenant), match, self._metrics)
            async for response in follow(read, message, token, after, settings, live):
                yield response

    async def alerts(self, request: pb.SubscribeAlertsRequest) -> AsyncIterator[Any]:
        """Alerts recorded before (unless start_at_end), one `current` marker, then the live
        tail with heartbeats; every message carries the resume token."""

        def message(alerts: list[common.Alert], token: str, current: bool) -> Any:
            return pb.SubscribeAlertsResponse(alerts=alerts, resume_token=token, current=current)

        async for response in self._tail(_ALERTS, request, request.rule_id, message):
            yield response

    async def window_results(self, request: pb.SubscribeWindowResultsRequest) -> AsyncIterator[Any]:
        """Window results, as `alerts` for alerts."""

        def message(results: list[common.WindowResult], token: str, current: bool) -> Any:
            return pb.SubscribeWindowResultsResponse(
                window_results=results, resume_token=token, current=current
            )

        async for response in self._tail(_RESULTS, request, request.window_id, message):
            yield response
