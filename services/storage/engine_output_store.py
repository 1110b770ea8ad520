"""The SQL of what the processors' engines emit (migrations/0006_rules_and_windows.sql): alerts,
window results and late events, written in one transaction and each once (ON CONFLICT DO
NOTHING on its identity, so a batch replayed after a crash adds nothing; the listings are
services/storage/output_queries.py); and the partitions' engine checkpoints
(migrations/0010_engine_checkpoints.sql), saved in the outputs' transaction and fenced by the
lease epoch.

Fencing. The checkpoint's upsert runs first in the transaction: it locks the partition's row
(so writers of one partition commit one after the other) and changes it only for an epoch at
least the stored one. A lower epoch raises FailedPrecondition, which rolls the transaction back:
a fenced-out owner's outputs are not written either. Within one epoch the checkpoint never moves
back (a delayed retry of an earlier call stores its outputs, already stored, and keeps the
later checkpoint). A new owner's load raises the fence to its epoch before it reads. Outputs
sent without a checkpoint may name a fence (partition and epoch), checked against the stored
epoch under a share lock, which a new owner's load waits for.

Each table takes its rows as one JSON array expanded by `jsonb_to_recordset`: one statement per
table whatever the batch size, its row count is the number of new rows, and ragged values (an
alert's event ids) need no per-row statement.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.storage.event_fences import Fence
from services.storage.store import outage_is_unavailable
from streammesh.mesh.errors import FailedPrecondition

__all__ = ["AlertRow", "Checkpoint", "EngineOutputStore", "Fence", "Outputs", "WindowResultRow"]

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


_SAVE_CHECKPOINT = text(
    "INSERT INTO engine_checkpoints AS c (stream, partition, lease_epoch, last_entry_id,"
    " entry_ms, entry_seq, snapshot) VALUES (:stream, :partition, :epoch, :entry,"
    " CAST(:ms AS numeric), CAST(:seq AS numeric), :snapshot)"
    " ON CONFLICT (stream, partition) DO UPDATE SET lease_epoch = EXCLUDED.lease_epoch,"
    " last_entry_id = EXCLUDED.last_entry_id, entry_ms = EXCLUDED.entry_ms,"
    " entry_seq = EXCLUDED.entry_seq, snapshot = EXCLUDED.snapshot, saved_at = now()"
    " WHERE c.lease_epoch < EXCLUDED.lease_epoch OR (c.lease_epoch = EXCLUDED.lease_epoch"
    " AND (c.entry_ms, c.entry_seq) <= (EXCLUDED.entry_ms, EXCLUDED.entry_seq))"
    " RETURNING true"
)
# The conflicting row stays locked by the upsert above even when its WHERE said no.
_STORED_EPOCH = text(
    "SELECT lease_epoch FROM engine_checkpoints WHERE stream = :stream AND partition = :partition"
)
_FENCE_EPOCH = text(
    "SELECT lease_epoch FROM engine_checkpoints WHERE stream = :stream AND partition = :partition"
    " FOR SHARE"
)
_RAISE_FENCE = text(
    "INSERT INTO engine_checkpoints AS c (stream, partition, lease_epoch, last_entry_id,"
    " entry_ms, entry_seq) VALUES (:stream, :partition, :epoch, '', -1, -1)"
    " ON CONFLICT (stream, partition) DO UPDATE SET lease_epoch = EXCLUDED.lease_epoch"
    " WHERE c.lease_epoch <= EXCLUDED.lease_epoch"
    " RETURNING lease_epoch, last_entry_id, snapshot, saved_at"
)
_READ_CHECKPOINT = text(
    "SELECT lease_epoch, last_entry_id, snapshot, saved_at FROM engine_checkpoints"
    " WHERE stream = :stream AND partition = :partition"
)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One partition's engine state and the queue entry it covers; `entry` is the entry id's
    (milliseconds, sequence)."""

    stream: str
    partition: int
    lease_epoch: int
    last_entry_id: str
    entry: tuple[int, int]
    snapshot: bytes
    saved_at: dt.datetime | None = None


def _stale(stream: str, partition: int, epoch: int, stored: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"engine checkpoint of {stream} partition {partition}: lease epoch {epoch} is older than"
        f" the stored epoch {stored}; the partition has a newer owner, nothing was written"
    )


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


Committed = Callable[[Literal["alerts", "window_results"], Iterable[str]], None]
"""Told, after a commit, the tailed table that got rows and their tenants (live feeds)."""


class EngineOutputStore:
    def __init__(self, engine: AsyncEngine, committed: Committed | None = None) -> None:
        self._engine = engine
        self._committed = committed

    async def store(
        self, outputs: Outputs, checkpoint: Checkpoint | None = None, fence: Fence | None = None
    ) -> tuple[int, int, int, bool]:
        """New alerts, window results and late events written (the rest existed), and whether
        the checkpoint was saved (False without one, or when the stored one is later in the
        same epoch). FailedPrecondition, writing nothing, for a checkpoint or fence of a stale
        epoch."""
        written = []
        saved = False
        async with outage_is_unavailable("engine outputs write"), self._engine.begin() as conn:
            if checkpoint is not None:
                saved = await self._save(conn, checkpoint)
            elif fence is not None:
                await self._check(conn, fence)
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
        if self._committed is not None:
            if written[0]:
                self._committed("alerts", (row["tenant"] for row in outputs.alerts))
            if written[1]:
                self._committed("window_results", (row["tenant"] for row in outputs.window_results))
        return written[0], written[1], written[2], saved

    async def _save(self, conn: AsyncConnection, checkpoint: Checkpoint) -> bool:
        where = {"stream": checkpoint.stream, "partition": checkpoint.partition}
        result = await conn.execute(
            _SAVE_CHECKPOINT,
            {
                **where,
                "epoch": checkpoint.lease_epoch,
                "entry": checkpoint.last_entry_id,
                "ms": checkpoint.entry[0],
                "seq": checkpoint.entry[1],
                "snapshot": checkpoint.snapshot,
            },
        )
        if result.first() is not None:
            return True
        stored = (await conn.execute(_STORED_EPOCH, where)).scalar_one()
        if stored > checkpoint.lease_epoch:
            raise _stale(checkpoint.stream, checkpoint.partition, checkpoint.lease_epoch, stored)
        return False  # the same epoch, and the stored checkpoint is further on: kept

    async def _check(self, conn: AsyncConnection, fence: Fence) -> None:
        # FOR SHARE: a new owner's fence cannot be raised between this check and the commit,
        # so no output of an owner fenced out before the commit lands after it.
        where = {"stream": fence.stream, "partition": fence.partition}
        stored = (await conn.execute(_FENCE_EPOCH, where)).scalar_one_or_none()
        if stored is not None and stored > fence.lease_epoch:
            raise _stale(fence.stream, fence.partition, fence.lease_epoch, stored)

    async def load_checkpoint(
        self, stream: str, partition: int, *, lease_epoch: int = 0
    ) -> Checkpoint | None:
        """The partition's checkpoint (None when no state was saved). With `lease_epoch`, the
        fence is raised to it first (FailedPrecondition when the stored epoch is higher); the
        returned lease_epoch is the fence after the call."""
        where = {"stream": stream, "partition": partition}
        async with outage_is_unavailable("engine checkpoint load"), self._engine.begin() as conn:
            if lease_epoch:
                row = (await conn.execute(_RAISE_FENCE, {**where, "epoch": lease_epoch})).first()
                if row is None:
                    stored = (await conn.execute(_STORED_EPOCH, where)).scalar_one()
                    raise _stale(stream, partition, lease_epoch, stored)
            else:
                row = (await conn.execute(_READ_CHECKPOINT, where)).first()
        if row is None or row.snapshot is None:
            return None
        ms, _, seq = row.last_entry_id.partition("-")
        return Checkpoint(
            stream,
            partition,
            row.lease_epoch,
            row.last_entry_id,
            (int(ms), int(seq)),
            bytes(row.snapshot),
            row.saved_at,
        )
