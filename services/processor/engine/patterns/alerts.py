"""What the pattern engine returns: alerts, late events, and the deterministic alert id."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.processor.engine.events import EngineEvent

__all__ = ["Alert", "LateEvent", "PatternOutput", "alert_id"]


def alert_id(tenant: str, rule_id: str, version: int, key: str, event_ids: Sequence[str]) -> str:
    """A stable id for a match: the same rule version, key and causing events give the same id in
    every run, so storage can insert alerts with ON CONFLICT (id) DO NOTHING after a replay."""
    digest = hashlib.sha256()
    for part in (tenant, rule_id, str(version), key, *event_ids):
        # A separator that cannot occur in the parts' UTF-8 makes the encoding unambiguous.
        digest.update(part.encode())
        digest.update(b"\xff")
    return digest.hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Alert:
    """One match of one rule version.

    `first_event_time_nanos`/`last_event_time_nanos` span the causing events (for an absence,
    both are the first event's time and `detail["deadline_nanos"]` is when the watermark passed
    the end of the wait). `detail` holds kind-specific facts (values seen, counts, the window)."""

    alert_id: str
    rule_id: str
    rule_version: int
    tenant: str
    kind: str
    key: str
    first_event_time_nanos: int
    last_event_time_nanos: int
    event_ids: tuple[str, ...]
    detail: Mapping[str, Any] = field(default_factory=dict, compare=True, hash=False)


@dataclass(frozen=True, slots=True)
class LateEvent:
    """An event whose time was at or before the engine's watermark when it arrived: the engine had
    already matched every event up to the watermark, so it is not matched (a match cannot be
    revised once alerted). The worker stores it as a late event with `reason`."""

    event: EngineEvent
    watermark_nanos: int
    reason: str = "pattern rules: event time at or before the partition's watermark"


@dataclass(slots=True)
class PatternOutput:
    """The result of one `process` call."""

    alerts: list[Alert] = field(default_factory=list)
    late: list[LateEvent] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)
    """Ids of events the engine had already taken (a redelivered batch); they are ignored."""
