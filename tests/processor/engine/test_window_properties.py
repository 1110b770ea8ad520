"""Property tests: every window kind, with in-order, out-of-order and late events, against the
brute-force reference in reference.py; and a snapshot/restore mid-stream equals an
uninterrupted run (with other batch sizes, so batching does not matter either)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.processor.engine.clock import ClockConfig
from services.processor.engine.events import EngineEvent
from services.processor.engine.window_defs import WindowDef, parse_window_def
from services.processor.engine.window_outputs import LateEvent, WindowResult
from services.processor.engine.windows import WindowEngine
from tests.processor.engine.reference import (
    Expected,
    check_values,
    expected_fixed,
    expected_sessions,
    idle_watermarks,
)

IDLE = 1_000
FAR_FUTURE = 10**15
AGGREGATES = [
    {"name": "n", "fn": "count"},
    {"name": "total", "fn": "sum", "field": "payload.amount"},
    {"name": "low", "fn": "min", "field": "payload.amount"},
    {"name": "high", "fn": "max", "field": "payload.amount"},
    {"name": "avg", "fn": "mean", "field": "payload.amount"},
    {"name": "users", "fn": "distinct", "field": "payload.user"},
    {"name": "p50", "fn": "p50", "field": "payload.amount"},
    {"name": "p99", "fn": "p99", "field": "payload.amount"},
]
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def _events(draw: Any, ordered: bool) -> list[EngineEvent]:
    count = draw(st.integers(1, 40))
    amounts = st.one_of(
        st.integers(-50, 50),
        st.floats(-1e3, 1e3, allow_nan=False),
        st.none(),
        st.just("not a number"),
    )
    events = []
    for index in range(count):
        payload: dict[str, Any] = {"user": draw(st.sampled_from(["u1", "u2", "u3", "u4"]))}
        amount = draw(amounts)
        if amount is not None:
            payload["amount"] = amount
        events.append(
            EngineEvent(
                id=f"e{index}",
                key=draw(st.sampled_from(["a", "b", "c", "d", "e"])),
                type="t",
                event_time_nanos=draw(st.integers(0, 300)),
                partition=draw(st.integers(0, 1)),
                tenant="acme",
                payload=payload,
            )
        )
    if ordered:
        events.sort(key=lambda e: e.event_time_nanos)
    return events


def _definition(kind: str, size: int, step: int, gap: int, lateness: int) -> WindowDef:
    raw: dict[str, Any] = {
        "id": kind,
        "tenant": "acme",
        "event_type": "t",
        "kind": kind,
        "allowed_lateness": f"{lateness}ns",
        "aggregates": AGGREGATES,
    }
    if kind == "session":
        raw["gap"] = f"{gap}ns"
    else:
        raw["size"] = f"{size}ns"
        if kind == "hopping":
            raw["step"] = f"{step}ns"
    return parse_window_def(raw)


def _run(
    engine: WindowEngine, events: Sequence[EngineEvent], batch: int
) -> tuple[list[WindowResult], list[LateEvent]]:
    results: list[WindowResult] = []
    late: list[LateEvent] = []
    for offset in range(0, len(events), batch):
        outputs = engine.process(events[offset : offset + batch], now_nanos=0)
        results += outputs.results
        late += outputs.late
    return results, late


def _flush(engine: WindowEngine) -> list[WindowResult]:
    """Close every window: the partitions go idle and their watermarks advance."""
    results = engine.process([], now_nanos=0).results
    return results + engine.process([], now_nanos=FAR_FUTURE).results


def _check(
    expected: Expected, results: list[WindowResult], late: list[LateEvent], kind: str
) -> None:
    latest: dict[tuple[int, str, int, int], WindowResult] = {}
    emissions: dict[tuple[int, str, int, int], list[int]] = {}
    for result in results:
        identity = (result.partition, result.group, result.start_nanos, result.end_nanos)
        emissions.setdefault(identity, []).append(result.revision)
        latest[identity] = result
    # Revisions of a window count up from 0, one emission each, never twice.
    for revisions in emissions.values():
        assert revisions == list(range(len(revisions)))
    alive = {identity: r for identity, r in latest.items() if not r.retracted}
    assert set(alive) == set(expected.windows)
    for identity, result in alive.items():
        check_values(dict(result.values), expected.windows[identity])
    if kind != "session":
        for identity, revisions in emissions.items():
            on_time = expected.on_time.get(identity, 0)
            assert len(revisions) == (1 if on_time else 0) + expected.revisions.get(identity, 0)
            if on_time:
                final = next(
                    r
                    for r in results
                    if r.revision == 0
                    and (r.partition, r.group, r.start_nanos, r.end_nanos) == identity
                )
                assert final.values["n"] == on_time
    assert {(e.event_id, e.window_start_nanos) for e in late} == expected.late
    assert len(late) == len(expected.late)


def _clock(out_of_orderness: int) -> ClockConfig:
    return ClockConfig(out_of_orderness_nanos=out_of_orderness, idle_timeout_nanos=IDLE)


@PROPERTY_SETTINGS
@given(
    events=st.one_of(_events(ordered=True), _events(ordered=False)),
    size=st.sampled_from([10, 30, 60]),
    out_of_orderness=st.sampled_from([0, 5, 40]),
    lateness=st.sampled_from([0, 15, 100]),
    batch=st.integers(1, 50),
)
def test_tumbling_windows_match_the_reference(
    events: list[EngineEvent], size: int, out_of_orderness: int, lateness: int, batch: int
) -> None:
    definition = _definition("tumbling", size, size, 0, lateness)
    engine = WindowEngine([definition], _clock(out_of_orderness))
    results, late = _run(engine, events, batch)
    results += _flush(engine)
    _check(expected_fixed(definition, events, out_of_orderness), results, late, "tumbling")


@PROPERTY_SETTINGS
@given(
    events=st.one_of(_events(ordered=True), _events(ordered=False)),
    size_step=st.sampled_from([(30, 10), (20, 20), (50, 20), (60, 15), (12, 8)]),
    out_of_orderness=st.sampled_from([0, 5, 40]),
    lateness=st.sampled_from([0, 15, 100]),
    batch=st.integers(1, 50),
)
def test_hopping_windows_match_the_reference(
    events: list[EngineEvent],
    size_step: tuple[int, int],
    out_of_orderness: int,
    lateness: int,
    batch: int,
) -> None:
    size, step = size_step
    definition = _definition("hopping", size, step, 0, lateness)
    engine = WindowEngine([definition], _clock(out_of_orderness))
    results, late = _run(engine, events, batch)
    results += _flush(engine)
    _check(expected_fixed(definition, events, out_of_orderness), results, late, "hopping")


@PROPERTY_SETTINGS
@given(
    events=st.one_of(_events(ordered=True), _events(ordered=False)),
    gap=st.sampled_from([5, 20, 50]),
    out_of_orderness=st.sampled_from([0, 5, 40]),
    lateness=st.sampled_from([0, 15, 100]),
    batch=st.integers(1, 50),
)
def test_session_windows_match_the_reference(
    events: list[EngineEvent], gap: int, out_of_orderness: int, lateness: int, batch: int
) -> None:
    definition = _definition("session", 0, 0, gap, lateness)
    engine = WindowEngine([definition], _clock(out_of_orderness))
    results, late = _run(engine, events, batch)
    results += _flush(engine)
    _check(expected_sessions(definition, events, out_of_orderness), results, late, "session")


@PROPERTY_SETTINGS
@given(
    events=_events(ordered=False),
    cut=st.integers(0, 40),
    batches=st.tuples(st.integers(1, 50), st.integers(1, 50)),
    out_of_orderness=st.sampled_from([0, 20]),
    lateness=st.sampled_from([0, 30]),
)
def test_restoring_a_snapshot_mid_stream_gives_the_uninterrupted_results(
    events: list[EngineEvent],
    cut: int,
    batches: tuple[int, int],
    out_of_orderness: int,
    lateness: int,
) -> None:
    definitions = [
        _definition("tumbling", 30, 30, 0, lateness),
        _definition("hopping", 40, 10, 0, lateness),
        _definition("session", 0, 0, 15, lateness),
    ]
    clock = _clock(out_of_orderness)
    uninterrupted = WindowEngine(definitions, clock)
    expected_results, expected_late = _run(uninterrupted, events, batches[0])
    expected_results += _flush(uninterrupted)

    first = WindowEngine(definitions, clock)
    results, late = _run(first, events[:cut], batches[1])
    snapshots = {partition: first.snapshot(partition) for partition in first.partitions()}
    resumed = WindowEngine(definitions, clock)
    for partition, data in snapshots.items():
        resumed.restore(partition, data)
    more_results, more_late = _run(resumed, events[cut:], batches[1])
    more_results += _flush(resumed)
    assert results + more_results == expected_results
    assert late + more_late == expected_late


@PROPERTY_SETTINGS
@given(
    events=_events(ordered=False),
    kind=st.sampled_from(["tumbling", "hopping", "session"]),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    pauses=st.lists(st.integers(0, 3 * IDLE), min_size=9, max_size=9),
    idle_polls=st.lists(st.booleans(), min_size=9, max_size=9),
    lateness=st.sampled_from([0, 15, 100]),
)
def test_idle_partitions_advance_and_windows_still_match_the_reference(
    events: list[EngineEvent],
    kind: str,
    cuts: list[int],
    pauses: list[int],
    idle_polls: list[bool],
    lateness: int,
) -> None:
    """Batches arrive with processing-time pauses (some with idle polls between them), so one
    partition's watermark moves on by itself while the other gets events."""
    definition = _definition(kind, 30, 10 if kind == "hopping" else 30, 15, lateness)
    out_of_orderness = 5
    bounds = sorted({0, len(events), *(min(c, len(events)) for c in cuts)})
    calls: list[tuple[list[EngineEvent], int]] = []
    now = 0
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        now += pauses[index]
        if idle_polls[index]:
            calls.append(([], now))
            now += pauses[index]
        calls.append((events[start:stop], now))
    engine = WindowEngine([definition], _clock(out_of_orderness))
    results: list[WindowResult] = []
    late: list[LateEvent] = []
    for batch, at in calls:
        outputs = engine.process(batch, now_nanos=at)
        results += outputs.results
        late += outputs.late
    results += engine.process([], now_nanos=now + FAR_FUTURE).results
    marks = idle_watermarks(calls, out_of_orderness, IDLE)
    reference = expected_sessions if kind == "session" else expected_fixed
    _check(reference(definition, events, out_of_orderness, marks), results, late, kind)
