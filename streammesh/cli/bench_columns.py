"""The raw path's queue entry: one batch of one partition, column-wise, built to be decoded with a
handful of C-level calls per group of entries instead of per-event Python work.

Fields, in this order (the reader relies on it): `n` the number of events; `id`, `key`, `type`,
`ct` (content type), `attr` (attributes as JSON object text), `prod` (producer) and `ten`
(tenant), each the
column's UTF-8 text joined by NUL (text a Postgres text column can hold never contains NUL, and
JSON text never does); `pay` the payloads concatenated and `plen` their lengths (uint32); `et` the
event times and `it` the ingest times as Postgres microsecond counts (int64) and `etn` the
nanoseconds below each event time's microsecond (int16). Arrays are in native byte order: the
entries never leave this machine.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.storage.sql import (
    INSERT_BATCH,
    INSERT_BATCH_JOINED,
    TEXT_SEPARATOR,
    texts_joinable,
)

__all__ = ["FIELDS", "RawEvent", "decode_group", "encode_entry", "entry_events"]

FIELDS = (
    b"n",
    b"id",
    b"key",
    b"type",
    b"ct",
    b"attr",
    b"prod",
    b"pay",
    b"plen",
    b"et",
    b"etn",
    b"it",
    b"ten",
)
_TEXT = {b"id", b"key", b"type", b"ct", b"attr", b"prod", b"ten"}
_ARRAYS = {b"plen": "I", b"et": "q", b"etn": "h", b"it": "q"}


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One event as the store takes it; times as Postgres microsecond counts."""

    id: str
    key: str
    type: str
    event_time: int
    event_time_nanos: int
    payload: bytes
    content_type: str
    attributes: str
    ingest_time: int
    producer: str
    tenant: str


def encode_entry(events: Sequence[RawEvent]) -> list[bytes]:
    """The entry's field/value pairs, flattened (as XADD takes them)."""

    def text(values: Any) -> bytes:
        return "\0".join(values).encode()

    values = [
        b"%d" % len(events),
        text(e.id for e in events),
        text(e.key for e in events),
        text(e.type for e in events),
        text(e.content_type for e in events),
        text(e.attributes for e in events),
        text(e.producer for e in events),
        b"".join(e.payload for e in events),
        array("I", [len(e.payload) for e in events]).tobytes(),
        array("q", [e.event_time for e in events]).tobytes(),
        array("h", [e.event_time_nanos for e in events]).tobytes(),
        array("q", [e.ingest_time for e in events]).tobytes(),
        text(e.tenant for e in events),
    ]
    return [item for pair in zip(FIELDS, values, strict=True) for item in pair]


def entry_events(fields: Sequence[bytes]) -> int:
    """The number of events of an entry, from its field/value list as XREADGROUP returns it."""
    return int(fields[1])


def decode_group(entries: Sequence[Sequence[bytes]]) -> tuple[str, tuple[Any, ...], Any]:
    """Consecutive entries' field/value lists as the statement to run, its columns in
    INSERT_BATCH's parameter order ($1..$10): ids, keys, types, event times, nanos, payloads,
    content types, attributes, ingest times, producers, and its $12, the tenants ($11 is the
    partition, the caller's). The text columns are joined texts for
    INSERT_BATCH_JOINED whenever storage would bind them so too (`texts_joinable`), else lists
    for INSERT_BATCH. Raises ValueError when a column's length disagrees."""
    count = sum(int(fields[1]) for fields in entries)

    def column(name: bytes) -> bytes:
        at = 2 * FIELDS.index(name) + 1
        return (b"\0" if name in _TEXT else b"").join(fields[at] for fields in entries)

    texts = {name: column(name).decode() for name in _TEXT}  # values joined by NUL
    if any(value.count("\0") + 1 != count for value in texts.values()):
        raise ValueError(f"an entry group of {count} events has columns of other lengths")
    separated = {name: value.replace("\0", TEXT_SEPARATOR) for name, value in texts.items()}
    joined = texts_joinable(list(separated.values()), count)

    def text(name: bytes) -> str | list[str]:
        return separated[name] if joined else texts[name].split("\0")

    def numbers(name: bytes) -> list[int]:
        return array(_ARRAYS[name], column(name)).tolist()

    blob = column(b"pay")
    ends = list(itertools.accumulate(numbers(b"plen")))
    payloads = [blob[start:end] for start, end in zip([0, *ends], ends, strict=False)]
    columns = (
        text(b"id"),
        text(b"key"),
        text(b"type"),
        numbers(b"et"),
        numbers(b"etn"),
        payloads,
        text(b"ct"),
        text(b"attr"),
        numbers(b"it"),
        text(b"prod"),
    )
    numeric = (columns[3], columns[4], columns[5], columns[8])
    if any(len(values) != count for values in numeric) or (ends and ends[-1] != len(blob)):
        raise ValueError(f"an entry group of {count} events has columns of other lengths")
    return (INSERT_BATCH_JOINED if joined else INSERT_BATCH), columns, text(b"ten")
