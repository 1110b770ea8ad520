"""Batch validation at the edge of the queue: the shared envelope rules for every event, plus
the batch's own limits. A batch is accepted whole or refused whole, with every violation named
(field path and reason), so a producer can fix its input without guessing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from streammesh.api.common.v1 import event_pb2
from streammesh.envelope import EnvelopeLimits, envelope_columns, event_violations
from streammesh.mesh.errors import InvalidArgument

__all__ = ["BatchLimits", "validate_batch"]

_MAX_VIOLATIONS_REPORTED = 20


@dataclass(frozen=True)
class BatchLimits:
    max_batch_events: int = 10_000
    envelope: EnvelopeLimits = field(default_factory=EnvelopeLimits)


def validate_batch(events: Sequence[event_pb2.Event], limits: BatchLimits) -> list[str]:
    """Check a batch and fill in missing ids; return the event ids in order.

    Raises InvalidArgument naming up to 20 violations (and how many there were in all).
    """
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
    if envelope_columns(events, limits.envelope, require_id=False) is None:
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
    ids = []
    for event in events:
        if not event.id:
            event.id = str(uuid.uuid4())
        ids.append(event.id)
    return ids
