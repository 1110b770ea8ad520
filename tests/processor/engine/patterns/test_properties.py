"""Every rule kind against the brute-force reference, with events in order, out of order and
late, in random batches under random watermarks; and a snapshot/restore at a random point gives
the same alerts as the uninterrupted run."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.processor.engine.events import EngineEvent
from services.processor.engine.patterns import (
    PatternEngine,
    PatternEngineConfig,
    alert_id,
    parse_rule,
)
from services.processor.engine.patterns.alerts import Alert
from tests.processor.engine.patterns.reference import RefAlert, matched_events, reference_alerts

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TYPES = ["a", "b", "c"]


@st.composite
def event_lists(draw: st.DrawFn) -> list[EngineEvent]:
    count = draw(st.integers(0, 40)) if draw(st.integers(0, 4)) == 0 else draw(st.integers(15, 40))
    events = []
    for i in range(count):
        payload: dict[str, Any] = {}
        value = draw(st.integers(0, 12))
        if value <= 10:
            payload["v"] = value
        elif value == 11:
            payload["v"] = "x"  # not a number: no threshold qualifies on it
        events.append(
            EngineEvent(
                id=f"e{i:03d}",
                key=draw(st.sampled_from(["k1", "k1", "k2"])),
                type=draw(st.sampled_from(TYPES)),
                # Coarse times: ties, and events exactly `within` apart, are common.
                event_time_nanos=5 * draw(st.integers(0, 16)),
                payload=payload,
            )
        )
    return events


@st.composite
def deliveries(draw: st.DrawFn) -> list[tuple[list[EngineEvent], int]]:
    """The events in some arrival order (sorted, shuffled a little, or shuffled), cut into
    batches, each with a watermark: max time seen minus a lag (a small lag makes late events),
    or a random number near it (the engine must ignore one that goes backwards)."""
    events = draw(event_lists())
    order = draw(st.sampled_from(["sorted", "nearly", "nearly", "shuffled"]))
    if order == "sorted":
        events.sort(key=lambda e: e.event_time_nanos)
    elif order == "shuffled":
        events = draw(st.permutations(events))
    else:
        events.sort(key=lambda e: e.event_time_nanos + 5 * draw(st.integers(0, 3)))
    calls: list[tuple[list[EngineEvent], int]] = []
    highest = 0
    position = 0
    while position < len(events):
        size = draw(st.integers(1, 6))
        batch = events[position : position + size]
        position += size
        highest = max([highest] + [e.event_time_nanos for e in batch])
        if draw(st.integers(0, 3)):
            mark = highest - draw(st.sampled_from([0, 15, 15, 40, 80]))
        else:
            mark = draw(st.integers(highest - 60, highest + 5))
        calls.append((batch, mark))
    if draw(st.booleans()):
        calls.append(([], draw(st.integers(0, 200))))
    return calls


def _pattern(draw: st.DrawFn, *, allow_any: bool = True) -> dict[str, Any]:
    pattern: dict[str, Any] = {}
    choices = [*TYPES, None] if allow_any else ["a", "a", "b", "c"]
    kind = draw(st.sampled_from(choices))
    if kind is not None:
        pattern["type"] = kind
    if not draw(st.integers(0, 2)):
        pattern["where"] = [{"field": "payload.v", "op": "gte", "value": draw(st.integers(0, 8))}]
    return pattern


def _duration(draw: st.DrawFn, low: int, high: int) -> str:
    """Mostly multiples of the events' 5 ns grid, so boundaries are hit exactly."""
    if draw(st.integers(0, 3)):
        return f"{5 * draw(st.integers(max(1, low // 5), high // 5))}ns"
    return f"{draw(st.integers(low, high))}ns"


@st.composite
def threshold_rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "kind": "threshold",
        "match": _pattern(draw),
        "field": "payload.v",
        "op": draw(st.sampled_from(["gt", "gte", "lt", "lte"])),
        "value": draw(st.integers(0, 10)),
        "mode": draw(st.sampled_from(["crossing", "level"])),
        "count": draw(st.integers(1, 3)),
    }
    if draw(st.booleans()):
        rule["within"] = _duration(draw, 1, 50)
    return rule


@st.composite
def rate_rules(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "kind": "rate",
        "match": _pattern(draw),
        "count": draw(st.integers(1, 4)),
        "within": _duration(draw, 1, 40),
    }


@st.composite
def sequence_rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "kind": "sequence",
        "steps": [_pattern(draw, allow_any=False) for _ in range(draw(st.integers(2, 3)))],
        "within": _duration(draw, 1, 60),
        "contiguity": draw(st.sampled_from(["strict", "relaxed"])),
    }
    if draw(st.booleans()):
        rule["scope"] = {"type": draw(st.lists(st.sampled_from(TYPES), min_size=1, unique=True))}
    return rule


@st.composite
def absence_rules(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "kind": "absence",
        "first": _pattern(draw, allow_any=False),
        "absent": _pattern(draw),
        "within": _duration(draw, 1, 40),
    }


def _as_ref(alert: Alert) -> RefAlert:
    return (
        alert.rule_id,
        alert.rule_version,
        alert.key,
        alert.event_ids,
        alert.first_event_time_nanos,
        alert.last_event_time_nanos,
    )


def _run(
    rule_doc: dict[str, Any] | list[dict[str, Any]],
    calls: list[tuple[list[EngineEvent], int]],
    restore_at: int | None,
    *,
    allow_duplicates: bool = False,
) -> tuple[list[Alert], set[str]]:
    docs = rule_doc if isinstance(rule_doc, list) else [{"id": "r", "version": 1, **rule_doc}]
    engine = PatternEngine()
    engine.apply_rules([parse_rule(doc) for doc in docs])
    alerts: list[Alert] = []
    late: set[str] = set()
    for i, (batch, mark) in enumerate(calls):
        if i == restore_at:
            engine = PatternEngine.restore(engine.snapshot())
        output = engine.process(batch, mark)
        alerts.extend(output.alerts)
        late.update(item.event.id for item in output.late)
        assert allow_duplicates or not output.duplicate_ids
    return alerts, late


def _check(rule_doc: dict[str, Any], calls: list[tuple[list[EngineEvent], int]], cut: int) -> None:
    rule = parse_rule({"id": "r", "version": 1, **rule_doc})
    ready, watermark, expected_late = matched_events(calls)
    expected = reference_alerts(rule, ready, watermark)
    alerts, late = _run(rule_doc, calls, None)
    assert sorted(_as_ref(a) for a in alerts) == expected
    assert late == expected_late
    for alert in alerts:
        assert alert.alert_id == alert_id("default", "r", 1, alert.key, alert.event_ids)
    assert len({a.alert_id for a in alerts}) == len(alerts)
    restored, _ = _run(rule_doc, calls, cut % (len(calls) + 1))
    assert restored == alerts
    # Each batch delivered again after the next one (as after a restore before the XACK), and
    # the first one once more at the end: not one alert more or less.
    again: list[tuple[list[EngineEvent], int]] = []
    for i, (batch, mark) in enumerate(calls):
        again.append((batch, mark))
        if i:
            again.append((calls[i - 1][0], mark))
    if calls:
        again.append((calls[0][0], calls[-1][1]))
    redelivered, _ = _run(rule_doc, again, None, allow_duplicates=True)
    assert redelivered == alerts


@SETTINGS
@given(threshold_rules(), deliveries(), st.integers(0, 50))
def test_threshold_rules_match_the_reference(
    rule: dict[str, Any], calls: list[tuple[list[EngineEvent], int]], cut: int
) -> None:
    _check(rule, calls, cut)


@SETTINGS
@given(rate_rules(), deliveries(), st.integers(0, 50))
def test_rate_rules_match_the_reference(
    rule: dict[str, Any], calls: list[tuple[list[EngineEvent], int]], cut: int
) -> None:
    _check(rule, calls, cut)


@SETTINGS
@given(sequence_rules(), deliveries(), st.integers(0, 50))
def test_sequence_rules_match_the_reference(
    rule: dict[str, Any], calls: list[tuple[list[EngineEvent], int]], cut: int
) -> None:
    _check(rule, calls, cut)


@SETTINGS
@given(absence_rules(), deliveries(), st.integers(0, 50))
def test_absence_rules_match_the_reference(
    rule: dict[str, Any], calls: list[tuple[list[EngineEvent], int]], cut: int
) -> None:
    _check(rule, calls, cut)


KINDS = [threshold_rules, rate_rules, sequence_rules, absence_rules]
# Mostly two versions of one kind (the common edit), sometimes a change of kind.
VERSION_PAIRS = st.one_of(
    *(st.tuples(kind(), kind()) for kind in KINDS),
    st.tuples(st.one_of(*(k() for k in KINDS)), st.one_of(*(k() for k in KINDS))),
)


@SETTINGS
@given(VERSION_PAIRS, st.integers(10, 60), st.booleans(), deliveries(), st.integers(0, 50))
def test_a_new_version_takes_over_at_its_activation_and_the_old_one_drains(
    pair: tuple[dict[str, Any], dict[str, Any]],
    activation: int,
    disable: bool,
    calls: list[tuple[list[EngineEvent], int]],
    cut: int,
) -> None:
    """Version 1 runs from 0, version 2 (any kind) from `activation`: version 2 sees exactly the
    events from its activation, version 1 finishes only the matches it began before it. When
    version 2 is disabled, version 1 sees only the events before the activation."""
    old, new = pair
    docs = [
        {"id": "r", "version": 1, **old},
        {"id": "r", "version": 2, "activation": activation, "enabled": not disable, **new},
    ]
    ready, watermark, _ = matched_events(calls)
    v1, v2 = (parse_rule(doc) for doc in docs)
    before = [e for e in ready if e.event_time_nanos < activation]
    after = [e for e in ready if e.event_time_nanos >= activation]
    if disable:
        expected = reference_alerts(v1, before, min(watermark, activation - 1))
    else:
        expected = reference_alerts(v1, ready, watermark, start_until=activation)
        expected += reference_alerts(v2, after, watermark)
    alerts, _ = _run(docs, calls, None)
    assert sorted(_as_ref(a) for a in alerts) == sorted(expected)
    restored, _ = _run(docs, calls, cut % (len(calls) + 1))
    assert restored == alerts


@SETTINGS
@given(
    threshold_rules(),
    rate_rules(),
    sequence_rules(),
    absence_rules(),
    deliveries(),
    st.integers(0, 3),
)
def test_a_batch_is_taken_as_its_events_one_by_one(
    threshold: dict[str, Any],
    rate: dict[str, Any],
    sequence: dict[str, Any],
    absence: dict[str, Any],
    calls: list[tuple[list[EngineEvent], int]],
    repeat_every: int,
) -> None:
    """A batch with nothing late and no repeat is held in bulk; any other one event by event.
    Either way the outputs are those of the events given one at a time (batches with repeats
    in them and redelivered ones included)."""
    if repeat_every:
        calls = [(batch + batch[::repeat_every], mark) for batch, mark in calls]
    docs = [
        {"id": f"r{n}", "version": 1, **doc}
        for n, doc in enumerate((threshold, rate, sequence, absence))
    ]
    config = PatternEngineConfig(dedupe_batches=10**6)  # counted per call: many more singly
    batched, single = PatternEngine(config), PatternEngine(config)
    for engine in (batched, single):
        engine.apply_rules([parse_rule(doc) for doc in docs])
    previous = batched.watermark_nanos
    for batch, mark in calls:
        whole = batched.process(batch, mark)
        parts = [single.process([event], previous) for event in batch[:-1]]
        parts.append(single.process(batch[-1:], mark))
        assert whole.alerts == [a for p in parts for a in p.alerts]
        assert whole.late == [x for p in parts for x in p.late]
        assert whole.duplicate_ids == [i for p in parts for i in p.duplicate_ids]
        previous = batched.watermark_nanos
        # The held ids (which tell a redelivery beyond the recent batches) are the held events'.
        assert batched._buffered_ids == {item[1] for item in batched._buffer}
    # The same state, but for the recent ids' cut into calls.
    whole_state, single_state = orjson.loads(batched.snapshot()), orjson.loads(single.snapshot())
    assert [i for ids in whole_state.pop("recent") for i in ids] == [
        i for ids in single_state.pop("recent") for i in ids
    ]
    assert whole_state == single_state
