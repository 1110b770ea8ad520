"""A queue entry's events as its readers take them, in either of the queue's two forms.

Ingest writes `streammesh.common.v1.QueuedColumns` under the entry field `cols`
(`COLUMNS_FIELD`): a list per field, so storage binds each column whole and nobody touches the
events one by one on the happy path. Entries written before hold a `QueuedBatch` under `batch`
(`BATCH_FIELD`); they are still read, stored and dead-lettered as they are. The processor passes
either on undecoded (`QueuedBody`); only a failed entry is decoded, into a QueuedBatch
(`QueuedBody.batch`), which is also the form a dead letter keeps.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from streammesh.api.common.v1 import event_pb2
from streammesh.mesh.tenancy import DEFAULT_TENANT
from streammesh.streams import BATCH_FIELD, COLUMNS_FIELD

__all__ = [
    "Entry",
    "QueuedBody",
    "columns_agree",
    "columns_tenant",
    "columns_to_batch",
    "entry_body",
    "expand_runs",
    "run_tenants",
]

T = TypeVar("T")

Entry = tuple[bytes, dict[bytes, bytes] | None]
"""A stream entry as XREADGROUP returns it: id and fields (None once deleted)."""


@dataclass(frozen=True, slots=True)
class QueuedBody:
    """An entry's events as serialized bytes, and which form they are in."""

    field: bytes
    """COLUMNS_FIELD (QueuedColumns) or BATCH_FIELD (QueuedBatch)."""
    data: bytes
    fences: tuple[tuple[str, int, int], ...] = ()
    """(stream, partition, lease epoch) of each partition the sender stores these events for,
    sent with them so that storage refuses a stale owner's store (StoreEventsRequest.fences);
    empty: unfenced."""

    @property
    def columnar(self) -> bool:
        return self.field == COLUMNS_FIELD

    def batch(self) -> event_pb2.QueuedBatch:
        """The events as a QueuedBatch; DecodeError when the bytes are not a valid entry."""
        if not self.columnar:
            return event_pb2.QueuedBatch.FromString(self.data)
        try:
            return columns_to_batch(event_pb2.QueuedColumns.FromString(self.data))
        except ValueError as error:
            raise DecodeError(f"not a valid QueuedColumns: {error}") from error


def entry_body(fields: dict[bytes, bytes] | None) -> QueuedBody:
    """The entry's events; DecodeError when it has neither field. An entry holding both is
    read as columns (ingest never writes both)."""
    for name in (COLUMNS_FIELD, BATCH_FIELD):
        if fields and name in fields:
            return QueuedBody(name, fields[name])
    raise DecodeError("entry has no batch field")


def columns_agree(columns: event_pb2.QueuedColumns) -> bool:
    """Whether the lists describe one set of events: one element per event in every per-event
    list, one per run in the run lists, and runs that add up to the events."""
    count = len(columns.ids)
    runs = len(columns.run_lengths)
    return (
        len(columns.keys)
        == len(columns.types)
        == len(columns.payloads)
        == len(columns.content_types)
        == len(columns.attributes)
        == len(columns.event_time_micros)
        == len(columns.event_time_nanos)
        == count
        and len(columns.ingest_time_micros) == len(columns.producers) == runs
        and len(columns.run_tenants) in (0, runs)
        and sum(columns.run_lengths) == count
    )


def run_tenants(columns: event_pb2.QueuedColumns) -> list[str]:
    """The tenant of each run: run_tenants with an empty value as "default" (DEFAULT_TENANT),
    and "default" for every run of an entry written before tenants. Call it on columns that
    `columns_agree`."""
    runs = len(columns.run_lengths)
    if not columns.run_tenants:
        return [DEFAULT_TENANT] * runs
    return [tenant or DEFAULT_TENANT for tenant in columns.run_tenants]


def columns_tenant(columns: event_pb2.QueuedColumns) -> str | None:
    """The one tenant of every run (ingest writes one run, so one tenant, per entry), or None
    when the runs belong to several (a processor's concatenation of entries)."""
    tenants = set(run_tenants(columns)) or {DEFAULT_TENANT}
    return tenants.pop() if len(tenants) == 1 else None


def expand_runs(values: Sequence[T], run_lengths: Sequence[int]) -> list[T]:
    """One value per event from one per run."""
    return list(itertools.chain.from_iterable(map(itertools.repeat, values, run_lengths)))


def _timestamp(micros: int, nanos: int) -> Timestamp:
    seconds, micro = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micro * 1000 + nanos)


def _attributes(text: str) -> dict[str, str]:
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("attributes is not a JSON object of strings")
    return value


def columns_to_batch(columns: event_pb2.QueuedColumns) -> event_pb2.QueuedBatch:
    """The same events event by event (the rare path: dead letters, naming a violation), with
    their tenant when they have one;
    ValueError when the columns cannot describe events: lists of different lengths, nanoseconds
    outside 0..999, attributes that are not a JSON object of strings."""
    if not columns_agree(columns):
        raise ValueError("the columns have different lengths")
    if any(not 0 <= n <= 999 for n in columns.event_time_nanos):
        raise ValueError("event_time_nanos outside 0..999")
    ingest_times = expand_runs(columns.ingest_time_micros, columns.run_lengths)
    producers = expand_runs(columns.producers, columns.run_lengths)
    tenant = columns_tenant(columns)
    # Events of several tenants have no one tenant in this form ("" = default): only a
    # processor's concatenation holds several, and it is never kept as one batch.
    batch = event_pb2.QueuedBatch(partition=columns.partition, tenant=tenant or "")
    for index, event_id in enumerate(columns.ids):
        attributes = columns.attributes[index]
        batch.events.append(
            event_pb2.QueuedEvent(
                event=event_pb2.Event(
                    id=event_id,
                    key=columns.keys[index],
                    type=columns.types[index],
                    event_time=_timestamp(
                        columns.event_time_micros[index], columns.event_time_nanos[index]
                    ),
                    payload=columns.payloads[index],
                    content_type=columns.content_types[index],
                    attributes=_attributes(attributes) if attributes != "{}" else None,
                ),
                ingest_time=_timestamp(ingest_times[index], 0),
                producer=producers[index],
            )
        )
    return batch
