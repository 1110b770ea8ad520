"""SubscribeAlerts: a live tail of one tenant's alerts in record order, resumable.

Alerts are listed by the last causing event's time, which is no order to tail: a lagging
partition records an alert about older events after a newer alert. Nor is their deterministic
id (it makes a redelivered batch write nothing twice). Migration 0013 gives them what events
have: seq from an identity (CACHE 1) and store_time read after it, and the tail applies the
events' argument unchanged (services.storage.queries.PAGING_GUARANTEE, with the horizon taken
over writers of `alerts`): an alert is sent only once its store_time is before the start of
every transaction still writing the table, so no alert with a lower seq can commit after the
cursor passed it. An alert whose insert conflicts (a replay) draws a seq and writes nothing: a
gap, never a repeat. The rounds, limits and heartbeats are SubscribeEvents'
(services.storage.subscriptions).

Resume tokens are the alert listing's unsigned position tokens, bound to the tenant and the
rule filter: forging one only moves the caller's own cursor over its own tenant's alerts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage import engine_outputs, registry
from services.storage.engine_output_store import AlertRow
from services.storage.queries import horizon_sql
from services.storage.store import outage_is_unavailable
from services.storage.subscriptions import Round, TailAdmissions, follow, resume_refusal
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.paging import Principal

__all__ = ["AlertSubscriptions"]

_HORIZON = text(f"SELECT {horizon_sql('alerts')}")
_ALERTS = text(
    "SELECT seq, store_time, alert_id, tenant, rule_id, rule_version, rule_kind, key,"
    " first_event_nanos, last_event_nanos, event_ids, detail::text AS detail, created_at"
    " FROM alerts WHERE tenant = :tenant AND seq > :after"
    " AND (CAST(:rule_id AS text) = '' OR rule_id = :rule_id) ORDER BY seq LIMIT :limit"
)
_END = text(
    "SELECT seq FROM alerts WHERE tenant = :tenant AND store_time < :horizon"
    " ORDER BY seq DESC LIMIT 1"
)
_SCOPE = "alert_tail"


class AlertSubscriptions:
    """The SubscribeAlerts handler's logic over storage's engine."""

    def __init__(self, engine: AsyncEngine, admissions: TailAdmissions) -> None:
        self._engine = engine
        self._admissions = admissions

    async def _round(self, tenant: str, rule_id: str, after: int) -> Round[common.Alert]:
        limit = self._admissions.settings.batch_events
        arguments: dict[str, Any] = {"tenant": tenant, "after": after, "rule_id": rule_id}
        async with outage_is_unavailable("alerts tail"), self._engine.connect() as conn:
            # Read committed: the rows' statement must see every commit the horizon's saw end.
            conn = await conn.execution_options(isolation_level="READ COMMITTED")
            horizon = (await conn.execute(_HORIZON)).scalar_one()
            rows = (await conn.execute(_ALERTS, {**arguments, "limit": limit + 1})).all()
        settled = []
        for row in rows[:limit]:
            if row.store_time >= horizon:
                break  # stop, not skip: store_time does not grow with seq across transactions
            settled.append(row)
        alerts = [
            engine_outputs.alert_message(AlertRow(*row[2:]))  # the listing's columns
            for row in settled
        ]
        last = settled[-1].seq if settled else after
        return Round(alerts, last, len(rows) > len(settled))

    async def _end(self, tenant: str) -> int:
        async with outage_is_unavailable("alerts tail"), self._engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="READ COMMITTED")
            horizon = (await conn.execute(_HORIZON)).scalar_one()
            found = (await conn.execute(_END, {"tenant": tenant, "horizon": horizon})).scalar()
        return 0 if found is None else int(found)

    async def subscribe(
        self, request: pb.SubscribeAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeAlertsResponse]:
        """Alerts recorded before (unless start_at_end), one `current` marker, then the live
        tail with heartbeats; every message carries the resume token."""
        tenant = registry.checked_tenant(request.tenant)
        rule_id = request.rule_id
        try:
            opened = engine_outputs.open_position(
                request.resume_token, (int,), _SCOPE, tenant, rule_id
            )
        except InvalidArgument as error:
            raise resume_refusal(error) from None
        with self._admissions.admitted(Principal(tenant, request.principal)):
            after = 0 if opened is None else max(0, int(opened[0]))
            if opened is None and request.start_at_end:
                after = await self._end(tenant)

            def token(seq: int) -> str:
                return engine_outputs.position_token([seq], _SCOPE, tenant, rule_id)

            def message(
                alerts: list[common.Alert], resume_token: str, current: bool
            ) -> pb.SubscribeAlertsResponse:
                return pb.SubscribeAlertsResponse(
                    alerts=alerts, resume_token=resume_token, current=current
                )

            async def read(after: int) -> Round[common.Alert]:
                return await self._round(tenant, rule_id, after)

            async for response in follow(read, message, token, after, self._admissions.settings):
                yield response
