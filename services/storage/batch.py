"""A StoreEvents batch as the insert's column arrays, checked against the envelope rules.

This is storage's hot path (every event passes here), so the common case is checked a column at
a time with builtins (`max(map(len, ...))`, one NUL search over the joined strings) instead of
event by event in Python. Those checks are conservative: any column that might break a rule
sends the whole batch through the exact per-event check (`_checked_columns`), which names every
violation. Either way the same rules as ingest's apply (streammesh.envelope).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from services.storage.store import BatchColumns
from services.storage.times import PG_EPOCH_SECONDS, TimeBound, pg_micros, time_bound
from streammesh.api.common.v1 import event_pb2
from streammesh.entries import columns_agree, columns_to_batch, expand_runs, run_tenants
from streammesh.envelope import (
    MAX_SECONDS,
    MIN_SECONDS,
    EnvelopeLimits,
    envelope_columns,
    event_violations,
    text_problem,
    timestamp_problem,
)
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.tenancy import DEFAULT_TENANT, canonical_tenant

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "Limits",
    "Violations",
    "batch_columns",
    "checked_time",
    "queued_columns",
    "row_partitions",
]

DEFAULT_CONTENT_TYPE = "application/json"
MAX_PARTITION = 2**31 - 1  # the column is a Postgres integer
_MAX_VIOLATIONS_REPORTED = 20
# One encoder for all rows: json.dumps with options builds a new encoder per call.
_json = json.JSONEncoder(separators=(",", ":")).encode
_PG_EPOCH_MICROS = PG_EPOCH_SECONDS * 1_000_000
# The Timestamp range in Unix microseconds (QueuedColumns' times).
_MIN_MICROS = MIN_SECONDS * 1_000_000
_MAX_MICROS = MAX_SECONDS * 1_000_000 + 999_999


@dataclass(frozen=True)
class Limits:
    """Request limits, taken from StorageSettings in `create_server`."""

    max_batch_events: int = 10_000
    """Events per StoreEvents batch."""
    max_text_chars: int = 256
    """Length of key, type, content_type, producer and filter strings."""
    max_filter_keys: int = 100
    """Keys in one EventFilter."""
    envelope: EnvelopeLimits = field(default_factory=EnvelopeLimits)
    """The event rules ingest applies too (streammesh.envelope)."""
    max_response_bytes: int = 15 * 1024 * 1024
    """A QueryEvents page stops early (with a token) rather than outgrow the message limit."""


class Violations:
    """Collects (field, reason) pairs; raises one InvalidArgument naming the first few."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, reason: str) -> None:
        self.items.append((field, reason))

    def text(self, field: str, value: str, max_chars: int) -> None:
        reason = text_problem(value, max_chars)
        if reason is not None:
            self.add(field, reason)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:_MAX_VIOLATIONS_REPORTED]
        field, reason = shown[0]
        raise InvalidArgument(
            f"{len(self.items)} invalid field(s); first: {field}: {reason}",
            field_violations=shown,
        )


def checked_time(value: timestamp_pb2.Timestamp, field: str, problems: Violations) -> TimeBound:
    """The instant as the store compares it, else record a violation (and return the Unix
    epoch as a placeholder)."""
    reason = timestamp_problem(value)
    if reason is not None:
        problems.add(field, reason)
        return pg_micros(timestamp_pb2.Timestamp()), 0
    return time_bound(value)


def batch_columns(batch: event_pb2.QueuedBatch, limits: Limits) -> BatchColumns:
    """The batch as column arrays in batch order; InvalidArgument (with every violation, up to
    a limit) if any event breaks a rule."""
    if len(batch.events) > limits.max_batch_events:
        raise InvalidArgument(
            f"a batch holds at most {limits.max_batch_events} events, got {len(batch.events)}",
            field_violations=[("batch.events", f"more than {limits.max_batch_events}")],
        )
    tenant = batch.tenant or DEFAULT_TENANT  # "" in entries written before tenants
    fast = batch.partition <= MAX_PARTITION and canonical_tenant(tenant) == tenant
    columns = _fast_columns(batch, limits) if fast else None
    if columns is None:
        columns = _checked_columns(batch, limits)  # raises with the violations
    return columns


def queued_columns(queued: event_pb2.QueuedColumns, limits: Limits) -> BatchColumns:
    """The columns as the insert takes them, checked a column at a time; InvalidArgument (with
    every violation, up to a limit) if any event breaks a rule."""
    count = len(queued.ids)
    if count > limits.max_batch_events:
        raise InvalidArgument(
            f"a batch holds at most {limits.max_batch_events} events, got {count}",
            field_violations=[("columns.ids", f"more than {limits.max_batch_events}")],
        )
    if not columns_agree(queued):
        raise InvalidArgument(
            "the columns of a batch must have one element per event (per run for ingest "
            "times, producers and tenants, or no tenants) and runs that add up to the events",
            field_violations=[("columns", "lists of different lengths")],
        )
    # With run_partitions, `partition` is ignored (row_partitions checks those instead).
    partition_ok = queued.partition <= MAX_PARTITION or bool(queued.run_partitions)
    columns = _fast_queued_columns(queued, limits) if partition_ok else None
    if columns is None:
        # Some event might break a rule: event by event, naming each violation.
        try:
            batch = columns_to_batch(queued)
        except ValueError as error:
            raise InvalidArgument(
                f"the columns do not describe events: {error}",
                field_violations=[("columns", str(error))],
            ) from error
        if queued.run_partitions:
            batch.partition = 0
        columns = _checked_columns(batch, limits)  # raises with the violations
        # The event-by-event form has one tenant for all; the runs may have several.
        columns.tenants = expand_runs(_checked_tenants(queued), queued.run_lengths)
    return columns


def _checked_tenants(queued: event_pb2.QueuedColumns) -> list[str]:
    """The tenant of each run ("default" for entries written before tenants); InvalidArgument
    for one that is not a well-formed tenant id in its stored form."""
    tenants = run_tenants(queued)
    if any(canonical_tenant(tenant) != tenant for tenant in set(tenants)):
        raise InvalidArgument(
            "columns.run_tenants holds a malformed tenant id",
            field_violations=[("columns.run_tenants", "not a lower-case tenant id")],
        )
    return tenants


def row_partitions(queued: event_pb2.QueuedColumns) -> list[int] | None:
    """The partition of every event of columns that hold several partitions' entries
    (`run_partitions`, one per run), or None when they hold one (`partition`);
    InvalidArgument when there is not one per run or one is out of the column's range. Call it
    after `queued_columns`, which checks that the runs add up to the events."""
    runs = queued.run_partitions
    if not runs:
        return None
    if len(runs) != len(queued.run_lengths):
        raise InvalidArgument(
            f"columns.run_partitions must hold one partition per run ({len(queued.run_lengths)}"
            f" runs), got {len(runs)}",
            field_violations=[("columns.run_partitions", "not one per run")],
        )
    if max(runs) > MAX_PARTITION:
        raise InvalidArgument(
            f"columns.run_partitions holds a partition larger than {MAX_PARTITION}",
            field_violations=[("columns.run_partitions", f"larger than {MAX_PARTITION}")],
        )
    return expand_runs(list(runs), queued.run_lengths)


def _fast_queued_columns(queued: event_pb2.QueuedColumns, limits: Limits) -> BatchColumns | None:
    """The columns, or None when some event might break a rule (the exact check decides).
    Every check is a builtin over a whole column: ids, keys and types present, lengths, one NUL
    search, time ranges by min/max; attributes other than "{}" are parsed (rare)."""
    envelope = limits.envelope
    ids, keys, types = list(queued.ids), list(queued.keys), list(queued.types)
    content_types, producers = list(queued.content_types), list(queued.producers)
    payloads, attributes = list(queued.payloads), list(queued.attributes)
    event_micros, event_nanos = list(queued.event_time_micros), list(queued.event_time_nanos)
    ingest_micros = list(queued.ingest_time_micros)  # one per run, like producers
    if not (all(ids) and all(keys) and all(types)) or (
        _longest(ids) > envelope.max_id_chars
        or _longest(keys) > envelope.max_key_chars
        or _longest(types) > envelope.max_type_chars
        or _longest(content_types) > envelope.max_content_type_chars
        or _longest(producers) > limits.max_text_chars
        or _longest(payloads) > envelope.max_payload_bytes
        or "\x00" in "".join(itertools.chain(ids, keys, types, content_types, producers))
    ):
        return None
    if ids and not (
        _MIN_MICROS <= min(event_micros) <= max(event_micros) <= _MAX_MICROS
        and _MIN_MICROS <= min(ingest_micros) <= max(ingest_micros) <= _MAX_MICROS
        and 0 <= min(event_nanos) <= max(event_nanos) <= 999
    ):
        return None
    if any(text != "{}" and not _attributes_allowed(text, envelope) for text in attributes):
        return None
    offset = _PG_EPOCH_MICROS
    runs = list(queued.run_lengths)
    tenants = _checked_tenants(queued)
    return BatchColumns(
        ids=ids,
        keys=keys,
        types=types,
        event_times=[micros - offset for micros in event_micros],
        event_time_nanos=event_nanos,
        payloads=payloads,
        content_types=[c or DEFAULT_CONTENT_TYPE for c in content_types],
        attributes=attributes,
        ingest_times=expand_runs([micros - offset for micros in ingest_micros], runs),
        producers=expand_runs(producers, runs),
        tenants=expand_runs(tenants, runs),
    )


def _longest(values: list[str] | list[bytes]) -> int:
    return max(map(len, values), default=0)


def _attributes_allowed(text: str, limits: EnvelopeLimits) -> bool:
    """Whether JSON text holds attributes an Event may carry (the envelope's rules)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and len(value) <= limits.max_attributes
        and all(
            isinstance(v, str)
            and len(k) + len(v) <= limits.max_attribute_chars
            and "\x00" not in k
            and "\x00" not in v
            for k, v in value.items()
        )
    )


def _fast_columns(batch: event_pb2.QueuedBatch, limits: Limits) -> BatchColumns | None:
    """The columns, or None when some event might break a rule (the exact check decides)."""
    queued = batch.events
    events = [q.event for q in queued]
    envelope = envelope_columns(events, limits.envelope, require_id=True)
    if envelope is None:
        return None
    producers = [q.producer for q in queued]
    if max(map(len, producers), default=0) > limits.max_text_chars or "\x00" in "".join(producers):
        return None
    if not all(q.HasField("ingest_time") for q in queued):
        return None
    ingest_stamps = [q.ingest_time for q in queued]
    seconds = [s.seconds for s in ingest_stamps]
    if min(seconds, default=0) < MIN_SECONDS or max(seconds, default=0) > MAX_SECONDS:
        return None
    if not all(0 <= s.nanos < 1_000_000_000 for s in ingest_stamps):
        return None
    # Ingest time to the microsecond (the StoredEvent contract); event time to the nanosecond.
    ingest_times = [pg_micros(s) for s in ingest_stamps]
    event_times = ingest_times.copy()
    event_time_nanos = [0] * len(events)
    for index, event in enumerate(events):
        # In range: envelope_columns checked every event that has one.
        if event.HasField("event_time"):
            stamp = event.event_time
            event_times[index] = pg_micros(stamp)
            event_time_nanos[index] = stamp.nanos % 1000
    return BatchColumns(
        ids=envelope.ids,
        keys=envelope.keys,
        types=envelope.types,
        event_times=event_times,
        event_time_nanos=event_time_nanos,
        payloads=envelope.payloads,
        content_types=[c or DEFAULT_CONTENT_TYPE for c in envelope.content_types],
        attributes=[_json(dict(e.attributes)) if e.attributes else "{}" for e in events],
        ingest_times=ingest_times,
        producers=producers,
        tenants=[batch.tenant or DEFAULT_TENANT] * len(events),
    )


def _checked_columns(batch: event_pb2.QueuedBatch, limits: Limits) -> BatchColumns:
    """Event by event, naming every violation; the columns if there is none."""
    problems = Violations()
    if batch.partition > MAX_PARTITION:
        problems.add("batch.partition", f"larger than {MAX_PARTITION}")
    tenant = batch.tenant or DEFAULT_TENANT
    if canonical_tenant(tenant) != tenant:
        problems.add("batch.tenant", "not a lower-case tenant id")
    columns = BatchColumns.empty()
    for index, queued in enumerate(batch.events):
        _check_event(queued, index, limits, problems, columns, tenant)
    problems.raise_if_any()
    return columns


def _check_event(
    queued: event_pb2.QueuedEvent,
    index: int,
    limits: Limits,
    problems: Violations,
    columns: BatchColumns,
    tenant: str,
) -> None:
    event = queued.event
    for name, reason in event_violations(event, limits.envelope, require_id=True):
        problems.add(f"batch.events[{index}].event.{name}", reason)
    problems.text(f"batch.events[{index}].producer", queued.producer, limits.max_text_chars)
    ingest_time: TimeBound = (0, 0)
    if queued.HasField("ingest_time"):
        ingest_time = checked_time(
            queued.ingest_time, f"batch.events[{index}].ingest_time", problems
        )
    else:
        problems.add(
            f"batch.events[{index}].ingest_time",
            "required: set by ingest when it accepts the event",
        )
    event_time = (ingest_time[0], 0)
    if event.HasField("event_time") and timestamp_problem(event.event_time) is None:
        event_time = time_bound(event.event_time)  # out of range: reported by event_violations
    columns.append(
        id=event.id,
        key=event.key,
        type=event.type,
        event_time=event_time,
        payload=event.payload,
        content_type=event.content_type or DEFAULT_CONTENT_TYPE,
        attributes=_json(dict(event.attributes)) if event.attributes else "{}",
        ingest_time=ingest_time[0],
        producer=queued.producer,
        tenant=tenant,
    )
