"""Repeated event ids: a stream with repeats (same id, same content) gives the windows' results
of the stream without them, for every window kind and across a restore at any point; a repeat
too late for every window becomes a late event; the remembered ids stay within the horizon."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.processor.engine.dedupe import horizons
from services.processor.engine.events import EngineEvent
from services.processor.engine.partition import PartitionEngine, PartitionOutputs, SnapshotError
from tests.processor.engine.test_partition import (
    CLOCK,
    SETTINGS,
    cuts,
    engine,
    event,
    rules,
    run,
    windows,
)


@st.composite
def unique_streams(draw: st.DrawFn) -> list[EngineEvent]:
    """Events with distinct ids: on time, out of order and beyond the allowed lateness."""
    t, events = 0, []
    for n in range(draw(st.integers(1, 50))):
        step = (
            draw(st.integers(-45, -1)) if draw(st.integers(0, 4)) == 0 else draw(st.integers(0, 12))
        )
        t = max(0, t + step)
        payload: dict[str, Any] = {"g": draw(st.sampled_from(["x", "y"])), "v": n % 11}
        kind = draw(st.sampled_from(["a", "a", "a", "b"]))
        events.append(event(n, t, kind, draw(st.sampled_from(["k1", "k2"])), **payload))
    return events


def with_repeats(data: st.DataObject, events: list[EngineEvent]) -> list[EngineEvent]:
    """`events` with repeats of some of them inserted after the original, near or far."""
    out = list(events)
    for _ in range(data.draw(st.integers(1, 15), label="repeats")):
        original = data.draw(st.integers(0, len(events) - 1), label="original")
        first = out.index(events[original])
        out.insert(data.draw(st.integers(first + 1, len(out)), label="at"), events[original])
    return out


def outputs(outputs_: list[PartitionOutputs]) -> tuple[Any, ...]:
    results = [r for o in outputs_ for r in o.window_results]
    late = {
        (x.window_id, x.event_id, x.window_start_nanos) for o in outputs_ for x in o.window_late
    }
    alerts = sorted(a.alert_id for o in outputs_ for a in o.alerts)
    return results, late, alerts


def check_against_unique(
    unique: list[PartitionOutputs], repeated: list[PartitionOutputs], stream: list[EngineEvent]
) -> None:
    results, late, alerts = outputs(unique)
    results_r, late_r, alerts_r = outputs(repeated)
    assert results_r == results  # the same results, revisions and watermarks, in the same order
    assert alerts_r == alerts
    # Extra late events only for repeats that came too late for every window of the type.
    repeated_ids = {e.id for i, e in enumerate(stream) if e in stream[:i]}
    assert {x[1] for x in late_r - late} <= repeated_ids
    assert late <= late_r
    dropped = sum(o.duplicates for o in repeated)
    assert dropped <= len(stream) - len({e.id for e in stream})


@SETTINGS
@given(unique_streams(), st.data())
def test_repeats_change_no_window_result(events: list[EngineEvent], data: st.DataObject) -> None:
    stream = with_repeats(data, events)
    bounds = cuts(data, len(stream))
    unique = run(engine(), events, cuts(data, len(events)), 0)
    repeated = run(engine(), stream, bounds, 0)
    # (About half the examples have results of all three kinds and nearly all drop repeats.)
    check_against_unique(unique, repeated, stream)


@SETTINGS
@given(unique_streams(), st.data())
def test_repeats_across_a_restore_at_any_point(
    events: list[EngineEvent], data: st.DataObject
) -> None:
    stream = with_repeats(data, events)
    split = data.draw(st.integers(0, len(stream)), label="split")
    head = cuts(data, split)
    tail = [split + c for c in cuts(data, len(stream) - split)]
    first = engine()
    before = run(first, stream, head, 0)
    saved = first.snapshot()
    restored = PartitionEngine.restore(saved, CLOCK, windows(), rules(), partition=3)
    assert restored.snapshot() == saved
    after = run(restored, stream, tail, 0)
    unique = run(engine(), events, [0, len(events)], 0)
    check_against_unique(unique, before + after, stream)
    # The same drops as the uninterrupted run.
    assert [o.duplicates for o in after] == [o.duplicates for o in run(first, stream, tail, 0)]
    assert restored.snapshot() == first.snapshot()


def test_a_repeat_is_dropped_counted_and_reaches_neither_windows_nor_rules() -> None:
    engine_ = engine()
    first = engine_.process([event(1, 5, v=9), event(2, 6)], 0)
    again = engine_.process([event(1, 5, v=9), event(3, 40), event(1, 5, v=9)], 0)
    assert (first.duplicates, again.duplicates) == (0, 2)
    assert again.duplicate_ids == ["e001", "e001"]
    assert again.rule_late == [] and again.window_late == []
    closed = engine_.process([event(4, 200)], 0).window_results
    tumble = [(r.start_nanos, r.values["n"]) for r in closed if r.window_id == "tumble"]
    assert tumble == [(0, 3), (50, 0)][:1]  # e001, e002, e003 once each


def test_a_repeat_beyond_the_horizon_is_a_late_event_and_the_ids_are_forgotten() -> None:
    engine_ = engine()
    horizon = horizons(windows())["acme"]["a"]  # hopping: 60 + 20
    assert horizon == 80
    engine_.process([event(1, 5, g="x"), *[event(n, 10 * n, g="x") for n in range(2, 40)]], 0)
    # The watermark (380) is far past 5 + 80: every window of e001 is gone, and so is its id.
    out = engine_.process([event(1, 5, g="x")], 0)
    assert out.duplicates == 0
    assert {x.event_id for x in out.window_late} == {"e001"}
    assert {x.window_id for x in out.window_late} == {"tumble", "hop", "visits"}
    saved = filter_part(engine_.snapshot())
    held = [i for _, _, _, buckets in saved for _, ids in buckets for i in ids]
    assert "e001" not in held
    # Bounded: only ids whose bucket can still reach an open window, a few horizons at most.
    assert 0 < len(held) <= 12
    for _, _, width, buckets in saved:
        for bucket, _ in buckets:
            assert (bucket + 1) * width - 1 + horizon > engine_.watermark_nanos


def test_memory_stays_bounded_over_a_long_stream() -> None:
    engine_ = engine()
    for start in range(0, 5_000, 100):
        engine_.process([event(n, 10 * n) for n in range(start, start + 100)], 0)
        held = engine_._dedupe.held()
        assert held <= 16, held
    assert len(filter_part(engine_.snapshot())[0][3]) <= 5


def test_a_format_1_snapshot_restores_with_no_remembered_ids() -> None:
    engine_ = engine()
    engine_.process([event(1, 5), event(2, 7)], 0)
    current = engine_.snapshot()
    head = struct.Struct(">4sHq")
    magic, _, partition = head.unpack_from(current)
    parts, offset = [], head.size
    for _ in range(3):
        (length,) = struct.unpack_from(">I", current, offset)
        parts.append(current[offset : offset + 4 + length])
        offset += 4 + length
    old = head.pack(magic, 1, partition) + b"".join(parts)
    restored = PartitionEngine.restore(old, CLOCK, windows(), rules())
    assert restored._dedupe.held() == 0
    assert restored.process([event(3, 9)], 0).duplicates == 0


def filter_part(snapshot: bytes) -> list[Any]:
    offset = struct.calcsize(">4sHq")
    for _ in range(3):
        (length,) = struct.unpack_from(">I", snapshot, offset)
        offset += 4 + length
    saved: list[Any] = orjson.loads(snapshot[offset + 4 :])
    return saved


def test_a_corrupt_filter_part_is_refused() -> None:
    engine_ = engine()
    engine_.process([event(1, 5)], 0)
    current = engine_.snapshot()
    offset = len(current) - len(orjson.dumps(filter_part(current)))
    for bad in ([["acme", "a", 0, []]], [["acme", "a", 12, [[[1], ["x"]]]]], {"x": 1}):
        part = orjson.dumps(bad)
        data = current[: offset - 4] + struct.pack(">I", len(part)) + part
        with pytest.raises(SnapshotError, match="duplicate filter"):
            PartitionEngine.restore(data, CLOCK, windows(), rules())
