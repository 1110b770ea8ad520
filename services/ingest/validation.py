"""Batch validation at the edge of the queue: the shared envelope rules for every event, plus
the batch's own limits. A batch is accepted whole or refused whole, with every violation named
(field path and reason), so a producer can fix its input without guessing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from streammesh.api.common.v1 import event_pb2
from streammesh.envelope import (
    EnvelopeColumns,
    EnvelopeLimits,
    envelope_columns,
    event_violations,
    text_problem,
)
from streammesh.mesh.errors import InvalidArgument

__all__ = ["BatchLimits", "validate_batch"]

_MAX_VIOLATIONS_REPORTED = 20


@dataclass(frozen=True)
class BatchLimits:
    max_batch_events: int = 10_000
    envelope: EnvelopeLimits = field(default_factory=EnvelopeLimits)


def validate_batch(
    events: Sequence[event_pb2.Event], limits: BatchLimits, *, producer: str = ""
) -> EnvelopeColumns:
    """Check a batch and fill in missing ids; return the events' fields as columns (ids
    included, in order), which the appender queues without reading the events again.

    Raises InvalidArgument naming up to 20 violations (and how many there were in all). The
    producer is checked too: storage would refuse what ingest had acknowledged.
    """
    producer_problem = text_problem(producer, limits.envelope.max_producer_chars)
    if producer_problem is not None:
        raise InvalidArgument(
            f"producer: {producer_problem}", field_violations=[("producer", producer_problem)]
        )
    if not events:
        raise InvalidArgument(
            "a batch needs at least one event", field_violations=[("events", "empty")]
        )
    if len(events) > limits.max_batch_events:
        raise InvalidArgument(
            f"a batch holds at most {limits.max_batch_events} events, got {len(events)}",
            field_violations=[("events", f"more than {limits.max_batch_events}")],
        )
    violations: list[tuple[str, str]] = []
    columns = envelope_columns(events, limits.envelope, require_id=False)
    if columns is None:
        # Some event breaks a rule: name every violation, event by event.
        for index, event in enumerate(events):
            violations += [
                (f"events[{index}].{name}", reason)
                for name, reason in event_violations(event, limits.envelope, require_id=False)
            ]
    if violations:
        shown = violations[:_MAX_VIOLATIONS_REPORTED]
        first_field, first_reason = shown[0]
        raise InvalidArgument(
            f"{len(violations)} invalid field(s) in the batch; first: {first_field}: {first_reason}",
            field_violations=shown,
        )
    # envelope_columns returns None exactly when event_violations finds something
    # (tests/test_envelope.py), so a batch that got here has its columns.
    assert columns is not None
    ids = columns.ids
    if not all(ids):
        for index, event in enumerate(events):
            if not event.id:
                event.id = ids[index] = str(uuid.uuid4())
    return columns
