"""The SQL of what the processors' engines emit (migrations/0006_rules_and_windows.sql): alerts,
window results and late events, written in one transaction and each once (ON CONFLICT DO
NOTHING on its identity, so a batch replayed after a crash adds nothing), and the tenant's
listings of alerts and window results.

Each table takes its rows as one JSON array expanded by `jsonb_to_recordset`: one statement per
table whatever the batch size, its row count is the number of new rows, and ragged values (an
alert's event ids) need no per-row statement.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.storage.store import outage_is_unavailable

__all__ = ["AlertRow", "EngineOutputStore", "Outputs", "WindowResultRow"]

_ALERT_COLUMNS = (
    "tenant text, alert_id text, rule_id text, rule_version integer, rule_kind text, key text,"
    " first_event_nanos bigint, last_event_nanos bigint, event_ids text[], detail jsonb"
)
_RESULT_COLUMNS = (
    "tenant text, window_id text, window_version integer, partition integer, group_key text,"
    ' start_nanos bigint, end_nanos bigint, revision integer, "values" jsonb,'
    " watermark_nanos bigint, retracted boolean"
)
_LATE_COLUMNS = (
    "tenant text, source text, definition_id text, definition_version integer, event_id text,"
    " window_start_nanos bigint, window_end_nanos bigint, event_key text,"
    " event_time_nanos bigint, watermark_nanos bigint, reason text"
)


def _names(columns: str) -> str:
    return ", ".join(part.strip().rsplit(" ", 1)[0] for part in columns.split(","))


@dataclass(slots=True)
class Outputs:
    """Rows to store, as dicts keyed by the table's column names."""

    alerts: list[dict[str, Any]] = field(default_factory=list)
    window_results: list[dict[str, Any]] = field(default_factory=list)
    late_events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AlertRow:
    alert_id: str
    tenant: str
    rule_id: str
    rule_version: int
    rule_kind: str
    key: str
    first_event_nanos: int
    last_event_nanos: int
    event_ids: list[str]
    detail: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class WindowResultRow:
    tenant: str
    window_id: str
    window_version: int
    partition: int
    group_key: str
    start_nanos: int
    end_nanos: int
    revision: int
    values: str
    watermark_nanos: int
    retracted: bool
    emitted_at: dt.datetime


class EngineOutputStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def store(self, outputs: Outputs) -> tuple[int, int, int]:
        """New alerts, window results and late events written (the rest existed)."""
        written = []
        async with outage_is_unavailable("engine outputs write"), self._engine.begin() as conn:
            for table, columns, rows in (
                ("alerts", _ALERT_COLUMNS, outputs.alerts),
                ("window_results", _RESULT_COLUMNS, outputs.window_results),
                ("late_events", _LATE_COLUMNS, outputs.late_events),
            ):
                if not rows:
                    written.append(0)
                    continue
                names = _names(columns)
                result = await conn.execute(
                    text(
                        f"INSERT INTO {table} ({names}) SELECT {names}"  # noqa: S608 (fixed terms)
                        f" FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r({columns})"
                        " ON CONFLICT DO NOTHING"
                    ),
                    {"rows": json.dumps(rows, ensure_ascii=False)},
                )
                written.append(result.rowcount)
        return written[0], written[1], written[2]

    async def page_alerts(
        self, tenant: str, *, rule_id: str, before: Sequence[Any] | None, limit: int
    ) -> list[AlertRow]:
        """Up to `limit` alerts, newest first, older than `before` (last event time, alert id)."""
        where = ["tenant = :tenant"]
        arguments: dict[str, Any] = {"tenant": tenant, "limit": limit}
        if rule_id:
            where.append("rule_id = :rule_id")
            arguments["rule_id"] = rule_id
        if before is not None:
            where.append("(last_event_nanos, alert_id) < (:time, :alert_id)")
            arguments.update(time=before[0], alert_id=before[1])
        statement = text(
            "SELECT alert_id, tenant, rule_id, rule_version, rule_kind, key, first_event_nanos,"  # noqa: S608 (fixed terms)
            " last_event_nanos, event_ids, detail::text AS detail, created_at FROM alerts"
            f" WHERE {' AND '.join(where)}"
            " ORDER BY last_event_nanos DESC, alert_id DESC LIMIT :limit"
        )
        async with outage_is_unavailable("alerts list"), self._engine.connect() as conn:
            result = await conn.execute(statement, arguments)
            return [AlertRow(**dict(row)) for row in result.mappings()]

    async def page_window_results(
        self, tenant: str, window_id: str, *, after: Sequence[Any] | None, limit: int
    ) -> list[WindowResultRow]:
        """Up to `limit` results of one window after `after` (the listing's order columns)."""
        order = "start_nanos, window_version, partition, group_key, end_nanos, revision"
        where = "tenant = :tenant AND window_id = :window_id"
        arguments: dict[str, Any] = {"tenant": tenant, "window_id": window_id, "limit": limit}
        if after is not None:
            where += f" AND ({order}) > (:a0, :a1, :a2, :a3, :a4, :a5)"
            arguments.update({f"a{i}": value for i, value in enumerate(after)})
        statement = text(
            "SELECT tenant, window_id, window_version, partition, group_key, start_nanos,"  # noqa: S608 (fixed terms)
            ' end_nanos, revision, "values"::text AS values, watermark_nanos, retracted,'
            f" emitted_at FROM window_results WHERE {where} ORDER BY {order} LIMIT :limit"
        )
        async with outage_is_unavailable("window results list"), self._engine.connect() as conn:
            result = await conn.execute(statement, arguments)
            return [WindowResultRow(**dict(row)) for row in result.mappings()]
