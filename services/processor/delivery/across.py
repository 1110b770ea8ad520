"""One StoreEvents call for the small groups of several partitions (a round at a low rate).

A processor reads all its partitions in one XREADGROUP, and ingest writes one entry per
(publish batch, partition): at a low rate a round holds a small group in each partition, and one
call and one commit per partition cost more than the rows. So the leading group of each
partition goes to storage together with the others' (as few calls as the limits allow), and
each partition is then acknowledged on its own (fenced, source/ownership.py).

The entries stay undecoded: serialized QueuedColumns concatenate into one message, and after
each entry's bytes the processor appends field 13 (`run_partitions`) with that entry's
partition. Ingest writes one run per entry, so the merged message holds one partition per run,
which is what storage needs to give every row its partition in one INSERT. An entry with more
runs (not written by ingest) breaks the one-per-run rule: storage refuses the call and the
worker stores partition by partition, where field 13 is not added. Entries of the old form
(QueuedBatch) have no such field and stay partition by partition.
"""

from __future__ import annotations

from collections.abc import Callable

from streammesh.api.common.v1 import event_pb2
from streammesh.entries import Entry, QueuedBody, entry_body
from streammesh.streams import COLUMNS_FIELD, COUNT_FIELD
from streammesh.wire import varint_field

__all__ = ["NO_PARTITION", "Chunk", "across_body", "across_chunks", "entry_event_count"]

Chunk = list[tuple[int, list[Entry]]]
"""(partition, its leading group of entries) for each partition of one call, in read order."""

_RUN_PARTITIONS = event_pb2.QueuedColumns.RUN_PARTITIONS_FIELD_NUMBER
_PARTITION = event_pb2.QueuedColumns.PARTITION_FIELD_NUMBER
NO_PARTITION = 2**32 - 1
"""What a body across partitions sets `partition` to (the last value of a field wins): beyond
the events table's column, so a storage that predates run_partitions, and would otherwise file
every row under the last entry's partition, refuses the call (INVALID_ARGUMENT) and the worker
stores partition by partition. A storage that reads run_partitions ignores `partition`."""


def across_chunks(
    work: list[tuple[int, list[Entry]]],
    group_of: Callable[[list[Entry]], list[Entry]],
    *,
    max_events: int,
    max_bytes: int,
) -> list[Chunk]:
    """The leading group (`group_of`) of each partition whose entries are columnar, packed in
    order into chunks of at most `max_events` events and `max_bytes` bytes (a group larger
    than either makes a chunk of its own). A chunk of one partition gains nothing: the caller
    drains it as usual."""
    chunks: list[Chunk] = []
    events = size = 0
    for partition, entries in work:
        group = group_of(entries)
        if not all(_columnar(fields) for _, fields in group):
            continue
        group_events = sum(entry_event_count(fields or {}) for _, fields in group)
        group_size = sum(sum(map(len, (fields or {}).values())) for _, fields in group)
        if not chunks or events + group_events > max_events or size + group_size > max_bytes:
            chunks.append([])
            events = size = 0
        chunks[-1].append((partition, group))
        events += group_events
        size += group_size
    return chunks


def across_body(chunk: Chunk) -> QueuedBody:
    """The chunk's entries as one QueuedColumns, undecoded: each entry's bytes followed by its
    partition as a `run_partitions` value, and `partition` set to NO_PARTITION at the end."""
    parts: list[bytes] = []
    for partition, group in chunk:
        tag = varint_field(_RUN_PARTITIONS, partition)
        for _, fields in group:
            parts.append(entry_body(fields).data)
            parts.append(tag)
    parts.append(varint_field(_PARTITION, NO_PARTITION))
    return QueuedBody(COLUMNS_FIELD, b"".join(parts))


def _columnar(fields: dict[bytes, bytes] | None) -> bool:
    return bool(fields) and COLUMNS_FIELD in (fields or {})


def entry_event_count(fields: dict[bytes, bytes]) -> int:
    """The entry's event count as ingest wrote it; 1 when absent or garbled (a poison entry
    must not break the grouping, only its own store)."""
    count = fields.get(COUNT_FIELD, b"")
    return int(count) if count.isdigit() else 1
