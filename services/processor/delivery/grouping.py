"""Consecutive entries of a partition as one StoreEvents call: which entries go together, and
their bodies joined undecoded (protobuf reads concatenated messages as one, repeated fields
appended in order, so the events keep their order)."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from services.processor.delivery.across import entry_event_count
from streammesh.entries import Entry, QueuedBody, entry_body

__all__ = ["group_at", "joined_body"]


def group_at(entries: list[Entry], start: int, *, max_events: int, max_bytes: int) -> list[Entry]:
    """Entries from `start` on that fit one StoreEvents call (at least one), all of one
    form (an entry without a body goes alone: its store fails by itself)."""
    events = size = 0
    end = start
    form = _body_field(entries[start][1])
    while end < len(entries):
        fields = entries[end][1] or {}
        events += entry_event_count(fields)
        size += sum(map(len, fields.values()))
        if end > start and (
            events > max_events or size > max_bytes or form is None or _body_field(fields) != form
        ):
            break
        end += 1
    return entries[start:end]


def joined_body(group: list[Entry]) -> QueuedBody:
    """Consecutive entries of one form as one body; DecodeError for an entry without one."""
    bodies = [entry_body(fields) for _, fields in group]
    return QueuedBody(bodies[0].field, b"".join(body.data for body in bodies))


def _body_field(fields: dict[bytes, bytes] | None) -> bytes | None:
    try:
        return entry_body(fields).field
    except DecodeError:
        return None
