"""The event envelope rules, one copy for every service that checks an event.

Ingest refuses a batch that breaks them before acknowledging it; storage checks the same rules
again before writing. Because both use this module, an event ingest acknowledged is never refused
by storage for its shape, which would otherwise strand acknowledged data in dead letters.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from streammesh.api.common.v1 import event_pb2

__all__ = [
    "EnvelopeColumns",
    "EnvelopeLimits",
    "assign_missing_ids",
    "envelope_columns",
    "event_violations",
    "text_problem",
    "timestamp_in_range",
    "timestamp_problem",
]

# google.protobuf.Timestamp's documented range, 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z: what every protobuf runtime accepts, and what the store keeps
# exactly, to the nanosecond (services/storage/times.py).
MIN_SECONDS = -62_135_596_800
MAX_SECONDS = 253_402_300_799


def assign_missing_ids(events: Iterable[event_pb2.Event]) -> None:
    """Give id-less events an id before their first attempt, so that no retry or resend (the
    client's, the gateway's, PublishBatch's automatic retry) can store them twice."""
    for event in events:
        if not event.id:
            event.id = str(uuid.uuid4())


@dataclass(frozen=True)
class EnvelopeLimits:
    """Sizes an event may have. Defaults are the contract documented in common/v1/event.proto."""

    max_id_chars: int = 128
    max_key_chars: int = 256
    max_type_chars: int = 128
    max_content_type_chars: int = 128
    max_payload_bytes: int = 1024 * 1024
    max_attributes: int = 64
    max_attribute_chars: int = 1024
    max_producer_chars: int = 256
    """The publishing principal, which the gateway names (not the client); the store's limit."""


def timestamp_in_range(seconds: int, nanos: int) -> bool:
    """Whether (seconds, nanos) is a valid google.protobuf.Timestamp."""
    return MIN_SECONDS <= seconds <= MAX_SECONDS and 0 <= nanos < 1_000_000_000


def timestamp_problem(value: Timestamp) -> str | None:
    """Why `value` is not a valid google.protobuf.Timestamp, or None."""
    if not 0 <= value.nanos < 1_000_000_000:
        return f"nanos must be 0..999999999, got {value.nanos}"
    if not MIN_SECONDS <= value.seconds <= MAX_SECONDS:
        return "outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59.999999999Z"
    return None


def text_problem(value: str, max_chars: int) -> str | None:
    if len(value) > max_chars:
        return f"longer than {max_chars} characters"
    if "\x00" in value:
        return "contains a NUL character, which the store cannot hold"
    return None


def event_violations(
    event: event_pb2.Event, limits: EnvelopeLimits, *, require_id: bool
) -> list[tuple[str, str]]:
    """Every (field, reason) the event breaks; field names are relative to the event.

    `require_id` is False at ingest, which assigns missing ids, and True after it.
    """
    problems: list[tuple[str, str]] = []
    if not event.id and require_id:
        problems.append(("id", "required: the idempotency key"))
    if not event.key:
        problems.append(("key", "required: the partition key that orders events"))
    if not event.type:
        problems.append(("type", "required, for example order.created"))
    for name, value, max_chars in (
        ("id", event.id, limits.max_id_chars),
        ("key", event.key, limits.max_key_chars),
        ("type", event.type, limits.max_type_chars),
        ("content_type", event.content_type, limits.max_content_type_chars),
    ):
        reason = text_problem(value, max_chars)
        if reason is not None:
            problems.append((name, reason))
    if len(event.payload) > limits.max_payload_bytes:
        problems.append(("payload", f"larger than {limits.max_payload_bytes} bytes"))
    if event.attributes:
        problems += _attribute_violations(event, limits)
    if event.HasField("event_time"):
        reason = timestamp_problem(event.event_time)
        if reason is not None:
            problems.append(("event_time", reason))
    return problems


def _attribute_violations(event: event_pb2.Event, limits: EnvelopeLimits) -> list[tuple[str, str]]:
    if len(event.attributes) > limits.max_attributes:
        return [("attributes", f"more than {limits.max_attributes} entries")]
    for key, value in event.attributes.items():
        if len(key) + len(value) > limits.max_attribute_chars:
            return [("attributes", f"an entry exceeds {limits.max_attribute_chars} characters")]
        if "\x00" in key or "\x00" in value:
            return [("attributes", "contains a NUL character, which the store cannot hold")]
    return []


@dataclass(frozen=True, slots=True)
class EnvelopeColumns:
    """The text and payload fields of a batch's events, a list per field, in batch order."""

    ids: list[str]
    keys: list[str]
    types: list[str]
    content_types: list[str]
    payloads: list[bytes]
    carriers: list[int]
    """Indexes of the events that carry attributes or an event time (the rare fields), in
    order: only these need a look at those fields."""


def _longest(values: Iterable[str | bytes]) -> int:
    return max(map(len, values), default=0)


def envelope_columns(
    events: Sequence[event_pb2.Event], limits: EnvelopeLimits, *, require_id: bool
) -> EnvelopeColumns | None:
    """The events' fields as columns when no event breaks a rule, checked a column at a time
    with builtins (about a tenth of the cost of `event_violations` per event); None when some
    event might, and `event_violations` per event must name what. The two agree on every batch
    (tests/test_envelope.py)."""
    ids = [e.id for e in events]
    keys = [e.key for e in events]
    types = [e.type for e in events]
    content_types = [e.content_type for e in events]
    payloads = [e.payload for e in events]
    if (require_id and not all(ids)) or not (all(keys) and all(types)):
        return None
    if (
        _longest(ids) > limits.max_id_chars
        or _longest(keys) > limits.max_key_chars
        or _longest(types) > limits.max_type_chars
        or _longest(content_types) > limits.max_content_type_chars
        or _longest(payloads) > limits.max_payload_bytes
        or "\x00" in "".join(itertools.chain(ids, keys, types, content_types))
    ):
        return None
    carriers = [
        index
        for index, event in enumerate(events)
        if event.attributes or event.HasField("event_time")
    ]
    for index in carriers:
        # Rare fields: only events that carry them pay for the exact check.
        if event_violations(events[index], limits, require_id=require_id):
            return None
    return EnvelopeColumns(ids, keys, types, content_types, payloads, carriers)
