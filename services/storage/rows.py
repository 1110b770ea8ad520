"""Stored rows as API messages, robust to rows the API cannot carry.

Storage writes only rows it validated, but a row written by hand, by an older release or by a
future one may hold what a StoredEvent cannot: an infinite or year-20000 timestamp, attributes
that are not a JSON object of strings. Such a row must not fail every page that touches it (that
would turn one row into an outage of every query), so it is rendered as near as the API allows,
and the caller logs one warning per page naming the rows.
"""

from __future__ import annotations

import json

from services.storage.store import StoredRow
from services.storage.times import set_timestamp
from streammesh.api.common.v1 import event_pb2

__all__ = ["stored_event"]

_UINT32_MAX = 2**32 - 1


def _attributes(text: str, problems: list[str]) -> dict[str, str]:
    if text == "{}":
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        problems.append("attributes is not a JSON object (dropped)")
        return {}
    if all(isinstance(v, str) for v in value.values()):
        return value
    problems.append("attributes holds values that are not strings (rendered as JSON)")
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def stored_event(row: StoredRow) -> tuple[event_pb2.StoredEvent, list[str]]:
    """The row as a StoredEvent, and what had to be changed to render it (empty for every row
    storage wrote itself)."""
    problems: list[str] = []
    partition = row.partition
    if not 0 <= partition <= _UINT32_MAX:
        problems.append(f"partition {partition} is negative (rendered as 0)")
        partition = 0
    stored = event_pb2.StoredEvent(
        event=event_pb2.Event(
            id=row.id,
            key=row.key,
            type=row.type,
            payload=row.payload,
            content_type=row.content_type,
            attributes=_attributes(row.attributes, problems),
        ),
        sequence=row.seq,
        partition=partition,
        producer=row.producer,
    )
    for name, target, micros, nanos in (
        ("event_time", stored.event.event_time, row.event_time, row.event_time_nanos),
        ("ingest_time", stored.ingest_time, row.ingest_time, 0),
        ("store_time", stored.store_time, row.store_time, 0),
    ):
        if not set_timestamp(target, micros, nanos):
            problems.append(f"{name} is outside the Timestamp range (clamped)")
    return stored, problems
