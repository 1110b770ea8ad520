"""A straightforward reference for the pattern rules: brute force over the full list of events
the engine has matched, recomputing each window from scratch. Slow and obviously right, it shares
only the rule model and the alert id with the engine."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

from services.processor.engine.events import EngineEvent
from streammesh.definitions.conditions import compile_condition
from streammesh.definitions.rules import (
    AbsenceSpec,
    EventPattern,
    RateSpec,
    Rule,
    SequenceSpec,
    ThresholdSpec,
)

__all__ = ["RefAlert", "matched_events", "reference_alerts"]

# (rule id, version, key, event ids, first time, last time)
RefAlert = tuple[str, int, str, tuple[str, ...], int, int]
Batch = Sequence[EngineEvent]


def matched_events(calls: Sequence[tuple[Batch, int]]) -> tuple[list[EngineEvent], int, set[str]]:
    """The events the engine should have matched after these process() calls, in matching
    order; the final watermark; the ids that should have been reported late."""
    watermark = -(2**63)
    seen: set[str] = set()
    taken: list[EngineEvent] = []
    late: set[str] = set()
    for batch, mark in calls:
        for event in batch:
            if event.id in seen:
                continue
            seen.add(event.id)
            if event.event_time_nanos <= watermark:
                late.add(event.id)
            else:
                taken.append(event)
        watermark = max(watermark, mark)
    ready = sorted(
        (e for e in taken if e.event_time_nanos <= watermark),
        key=lambda e: (e.event_time_nanos, e.id),
    )
    return ready, watermark, late


def _matches(pattern: EventPattern) -> Callable[[EngineEvent], bool]:
    where = None if pattern.where is None else compile_condition(pattern.where)

    def test(event: EngineEvent) -> bool:
        if pattern.types is not None and event.type not in pattern.types:
            return False
        return where is None or where(event)

    return test


def reference_alerts(
    rule: Rule, events: list[EngineEvent], watermark: int, start_until: int = 2**63
) -> list[RefAlert]:
    """The alerts of `rule` over `events` (all at or after its activation). `start_until`: the
    next version's activation, from which this version starts no new match."""
    events = [e for e in events if e.tenant == rule.tenant]
    keys = sorted({e.key for e in events})
    out: list[RefAlert] = []
    for key in keys:
        mine = [e for e in events if e.key == key]
        out.extend(_per_key(rule, key, mine, watermark, start_until))
    return sorted(out)


def _alert(rule: Rule, key: str, chosen: list[EngineEvent], last: int | None = None) -> RefAlert:
    return (
        rule.id,
        rule.version,
        key,
        tuple(e.id for e in chosen),
        chosen[0].event_time_nanos,
        chosen[-1].event_time_nanos if last is None else last,
    )


def _per_key(
    rule: Rule, key: str, events: list[EngineEvent], watermark: int, start_until: int
) -> list[RefAlert]:
    spec = rule.spec
    out: list[RefAlert] = []
    if isinstance(spec, ThresholdSpec):
        compare = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}[
            spec.op
        ]
        name = spec.field.split(".", 1)[1]
        match = _matches(spec.match)
        values = [
            (e, e.payload[name])
            for e in events
            if match(e) and name in e.payload and type(e.payload[name]) in (int, float)
        ]
        previous_beyond = False
        hits: list[EngineEvent] = []
        for event, value in values:
            t = event.event_time_nanos
            hits = [
                h
                for h in hits
                if spec.within_nanos is None or t - h.event_time_nanos <= spec.within_nanos
            ]
            if t >= start_until and (not hits or hits[0].event_time_nanos >= start_until):
                break  # superseded, and nothing left that began before
            beyond = compare(value, spec.value)
            qualifies = beyond and (spec.mode == "level" or not previous_beyond)
            previous_beyond = beyond
            if not qualifies:
                continue
            hits.append(event)
            if len(hits) >= spec.count:
                out.append(_alert(rule, key, hits))
                hits = []
    elif isinstance(spec, RateSpec):
        match = _matches(spec.match)
        candidates = [e for e in events if match(e)]
        after = 0
        for j, event in enumerate(candidates):
            before = [
                e
                for e in candidates[after:j]
                if event.event_time_nanos - e.event_time_nanos <= spec.within_nanos
            ]
            if event.event_time_nanos >= start_until and (
                not before or before[0].event_time_nanos >= start_until
            ):
                break
            window = [*before, event]
            if len(window) >= spec.count:
                out.append(_alert(rule, key, window))
                after = j + 1
    elif isinstance(spec, SequenceSpec):
        out.extend(_sequences(rule, spec, key, events, start_until))
    else:
        assert isinstance(spec, AbsenceSpec)
        first, absent = _matches(spec.first), _matches(spec.absent)
        for i, event in enumerate(events):
            if not first(event) or event.event_time_nanos >= start_until:
                continue
            deadline = event.event_time_nanos + spec.within_nanos
            ended = any(absent(e) and e.event_time_nanos <= deadline for e in events[i + 1 :])
            if not ended and deadline <= watermark:
                out.append(_alert(rule, key, [event]))
    return out


def _sequences(
    rule: Rule, spec: SequenceSpec, key: str, events: list[EngineEvent], start_until: int
) -> list[RefAlert]:
    scope = _matches(spec.scope)
    steps = [_matches(step) for step in spec.steps]
    seen = [e for e in events if scope(e)]
    out: list[RefAlert] = []
    after = 0
    while True:
        best: tuple[int, int, list[EngineEvent]] | None = None
        for s in range(after, len(seen)):
            if not steps[0](seen[s]) or seen[s].event_time_nanos >= start_until:
                continue
            taken = [seen[s]]
            for j in range(s + 1, len(seen)):
                if seen[j].event_time_nanos - seen[s].event_time_nanos > spec.within_nanos:
                    break
                if steps[len(taken)](seen[j]):
                    taken.append(seen[j])
                    if len(taken) == len(steps):
                        if best is None or (j, s) < best[:2]:
                            best = (j, s, taken)
                        break
                elif spec.contiguity == "strict":
                    break
        if best is None:
            return out
        out.append(_alert(rule, key, best[2]))
        after = best[0] + 1
