"""The pattern engine of one partition: events and a watermark in, alerts out; state to bytes.

How the worker drives it (one engine per owned partition):

    engine = PatternEngine()                     # or PatternEngine.restore(checkpoint_bytes)
    engine.apply_rules(rules)                    # at start and whenever the rule set changes
    output = engine.process(batch, watermark)    # per batch, watermark from the clock module
    store output.alerts (ON CONFLICT (alert_id) DO NOTHING) and output.late, and
    engine.snapshot() with them, then the fenced XACK
    engine.process([], watermark)                # an idle partition's watermark moves on: timers fire

Order: events are held until the watermark passes them and are then matched in (event time, id)
order, as Flink CEP does. So the alerts do not depend on arrival order or batch boundaries, only
on the events and the watermark; the price is that an alert comes when the watermark passes its
last event (the clock's out-of-orderness bound, plus the batch interval).

An event at or before the engine's watermark when it arrives is late: every event up to the
watermark has been matched and alerted on, so it is returned in `output.late` and not matched.
A redelivered event is ignored and its id returned in `output.duplicate_ids` when the engine
still holds it or took it in one of the last `dedupe_batches` batches. Either way a redelivered
batch raises nothing twice: an event is matched at most once, since the engine matches only
events it holds and holds only events after the watermark, which it has not matched yet; the
window of recent ids only tells a redelivered event from a late one. The engine reads no clock
and does no I/O.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from services.processor.engine.events import EngineEvent
from services.processor.engine.patterns.alerts import Alert, LateEvent, PatternOutput
from services.processor.engine.patterns.matcher_base import NEVER, Matcher
from services.processor.engine.patterns.ruleset import RuleSet
from streammesh.definitions.rules import Rule, parse_rule

__all__ = ["SNAPSHOT_FORMAT", "PatternEngine", "PatternEngineConfig", "SnapshotError"]

SNAPSHOT_FORMAT = 1


class SnapshotError(ValueError):
    """Bytes that are not a pattern engine snapshot of a format this code reads."""


@dataclass(frozen=True, slots=True)
class PatternEngineConfig:
    dedupe_batches: int = 8
    """For how many batches (calls that took events) their ids are remembered, to
    tell a redelivered event from a late one. Redelivery after a restore is of the batches
    checkpointed but not yet acknowledged, so this should be at least the number of batches
    between two checkpoints; it bounds the snapshot's size by batches, not by event rate."""


class PatternEngine:
    """Pattern rules over one partition's events. Not thread-safe; one per partition."""

    def __init__(self, config: PatternEngineConfig | None = None) -> None:
        self.config = config or PatternEngineConfig()
        self._watermark = -NEVER
        self._buffer: list[tuple[int, str, EngineEvent]] = []
        self._buffered_ids: set[str] = set()
        self._recent: deque[list[str]] = deque()
        self._recent_ids: set[str] = set()
        self._rules = RuleSet()

    @property
    def watermark_nanos(self) -> int:
        """Every event at or before this time has been matched (-2**63 before any watermark)."""
        return self._watermark

    @property
    def held_events(self) -> int:
        """Events received and waiting for the watermark to pass them."""
        return len(self._buffer)

    def partial_matches(self) -> dict[str, int]:
        """Keys with partial state per running rule version (`tenant/rule@version`), for metrics."""
        return {
            f"{m.rule.tenant}/{m.rule.id}@{m.rule.version}": len(m.states)
            for m in self._rules.matchers
        }

    def rules_reading(self, event: EngineEvent) -> list[Rule]:
        """The running rule versions that would take this event (its tenant and type, and its
        time within the version's activation): whom a late event concerns."""
        by_type = self._rules.index.get(event.tenant)
        if by_type is None:
            return []
        typed, anything = by_type
        t = event.event_time_nanos
        return [
            matcher.rule
            for matcher in typed.get(event.type, anything)
            if matcher.activation <= t < matcher.stop_at
        ]

    def apply_rules(self, rules: Iterable[Rule]) -> None:
        """Run exactly these rules from now on (see ruleset.py for what a version change does).
        Raises RuleSetError, leaving the engine unchanged, for a contradictory set."""
        self._rules.apply(rules, self._watermark)

    def process(self, events: Iterable[EngineEvent], watermark_nanos: int) -> PatternOutput:
        """Take a batch and the partition's watermark (a smaller one than before is ignored)."""
        output = PatternOutput()
        watermark = self._watermark
        buffer, buffered_ids, recent_ids = self._buffer, self._buffered_ids, self._recent_ids
        events = events if isinstance(events, list | tuple) else list(events)
        taken = [event.id for event in events]
        if (
            taken
            and min(event.event_time_nanos for event in events) > watermark
            and len(set(taken)) == len(taken)
            and buffered_ids.isdisjoint(taken)
            and recent_ids.isdisjoint(taken)
        ):
            # The common batch, none late and none a repeat: held in bulk (what the loop
            # below does for each event).
            buffer.extend([(event.event_time_nanos, event.id, event) for event in events])
            buffered_ids.update(taken)
        else:
            taken = []
            for event in events:
                event_id = event.id
                if event_id in buffered_ids or event_id in recent_ids:
                    output.duplicate_ids.append(event_id)
                elif event.event_time_nanos <= watermark:
                    output.late.append(LateEvent(event, watermark))
                else:
                    # Held as (time, id, event): sorting compares tuples in C, with no key
                    # function and no tie on id (ids are unique here), so the order never
                    # reaches the event.
                    buffer.append((event.event_time_nanos, event_id, event))
                    buffered_ids.add(event_id)
                    taken.append(event_id)
        self._remember(taken)
        if watermark_nanos > watermark:
            watermark = self._watermark = watermark_nanos
        if len(buffer) > 1:
            # Two sorted runs (the held events, the batch, mostly in order): near linear.
            buffer.sort()
        cut = bisect_left(buffer, (watermark + 1,))
        if cut:
            taken_now = buffer[:cut]
            del buffer[:cut]
            # In bulk (C loops): the events leave the buffer before any is matched.
            buffered_ids.difference_update([item[1] for item in taken_now])
            self._match([item[2] for item in taken_now], output.alerts)
        self._on_watermark(watermark, output.alerts)
        return output

    def _remember(self, taken: list[str]) -> None:
        if not taken:
            return  # an idle watermark tick must not push a real batch out of the window
        recent, recent_ids = self._recent, self._recent_ids
        recent.append(taken)
        recent_ids.update(taken)
        while len(recent) > self.config.dedupe_batches:
            recent_ids.difference_update(recent.popleft())

    def _match(self, ready: list[EngineEvent], alerts: list[Alert]) -> None:
        index = self._rules.index
        first, last = ready[0].event_time_nanos, ready[-1].event_time_nanos
        # Usually no version boundary falls inside the batch: then skip the per-event checks.
        bounded = any(
            not (m.activation <= first and last < m.stop_at) for m in self._rules.matchers
        )
        tenant: str | None = None
        typed: dict[str, tuple[Matcher, ...]] = {}
        anything: tuple[Matcher, ...] = ()
        for event in ready:
            if event.tenant != tenant:
                # A partition's events are mostly of one tenant: look it up when it changes.
                tenant = event.tenant
                by_type = index.get(tenant)
                typed, anything = by_type if by_type is not None else ({}, ())
            if bounded:
                t = event.event_time_nanos
                for matcher in typed.get(event.type, anything):
                    if matcher.activation <= t < matcher.stop_at:
                        matcher.on_event(event, alerts)
            else:
                for matcher in typed.get(event.type, anything):
                    matcher.on_event(event, alerts)

    def _on_watermark(self, watermark: int, alerts: list[Alert]) -> None:
        for matcher in self._rules.matchers:
            # A version stopped by a disabled one fires only what was due before the stop.
            matcher.on_watermark(min(watermark, matcher.stop_at - 1), alerts)
        self._rules.finish(watermark)

    def snapshot(self) -> bytes:
        """The whole state as bytes (JSON): the held events, the recent ids, each rule
        version with its effective activation and partial matches. Restoring it and feeding
        the same inputs gives the same outputs as the engine it was taken from."""
        # Swept first (which changes no output): expired partial matches are dropped now
        # rather than whenever the last sweep ran, so equal states give equal bytes, and a
        # restored engine sweeps on the same schedule as the one it was taken from.
        for running in self._rules.matchers:
            running.compact(min(self._watermark, running.stop_at - 1))
        versions = []
        for known_versions in self._rules.versions.values():
            for _, known in sorted(known_versions.items()):
                matcher = known.matcher
                versions.append(
                    {
                        "rule": dict(known.rule.source),
                        "activation": known.activation,
                        "running": matcher is not None,
                        "state": None if matcher is None else matcher.snapshot_state(),
                    }
                )
        return orjson.dumps(
            {
                "format": SNAPSHOT_FORMAT,
                "watermark": self._watermark,
                "held": [_event_row(item[2]) for item in self._buffer],
                "recent": list(self._recent),
                "versions": versions,
            }
        )

    @classmethod
    def restore(cls, data: bytes, config: PatternEngineConfig | None = None) -> PatternEngine:
        """An engine in the state `snapshot()` saved."""
        try:
            saved = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise SnapshotError(f"pattern engine snapshot: not JSON ({exc})") from None
        if not isinstance(saved, dict) or saved.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"pattern engine snapshot: expected format {SNAPSHOT_FORMAT}")
        engine = cls(config)
        engine._watermark = saved["watermark"]
        held = [_event_from_row(row) for row in saved["held"]]
        engine._buffer = [(event.event_time_nanos, event.id, event) for event in held]
        engine._buffered_ids = {event.id for event in held}
        engine._recent = deque(saved["recent"])
        engine._recent_ids = {event_id for ids in engine._recent for event_id in ids}
        for item in saved["versions"]:
            known = engine._rules.restore_version(
                parse_rule(item["rule"]), item["activation"], item["running"]
            )
            if known.matcher is not None:
                known.matcher.restore_state(item["state"])
        engine._rules.refresh()
        for matcher in engine._rules.matchers:
            matcher.schedule_sweep(min(engine._watermark, matcher.stop_at - 1))
        return engine


def _event_row(event: EngineEvent) -> list[Any]:
    return [
        event.id,
        event.key,
        event.type,
        event.event_time_nanos,
        event.partition,
        event.tenant,
        dict(event.payload),
        dict(event.attributes),
    ]


def _event_from_row(row: list[Any]) -> EngineEvent:
    event_id, key, event_type, t, partition, tenant, payload, attributes = row
    return EngineEvent(
        id=event_id,
        key=key,
        type=event_type,
        event_time_nanos=t,
        partition=partition,
        tenant=tenant,
        payload=payload,
        attributes=attributes,
    )
