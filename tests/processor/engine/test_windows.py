"""The window engine's behaviour case by case: finals, revisions, late events, retractions,
idle partitions, result identities, runtime definition changes and snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from services.processor.engine.clock import ClockConfig
from services.processor.engine.events import EngineEvent
from services.processor.engine.window_defs import parse_window_def
from services.processor.engine.window_outputs import LATE_BEYOND_ALLOWED_LATENESS
from services.processor.engine.windows import SnapshotError, WindowEngine

CLOCK = ClockConfig(out_of_orderness_nanos=0, idle_timeout_nanos=1_000)


def _def(kind: str = "tumbling", **extra: Any) -> Any:
    raw: dict[str, Any] = {
        "id": kind,
        "tenant": "acme",
        "event_type": "t",
        "kind": kind,
        "aggregates": [
            {"name": "n", "fn": "count"},
            {"name": "total", "fn": "sum", "field": "payload.x"},
        ],
    }
    raw.update({"size": "10ns"} if kind != "session" else {"gap": "10ns"})
    raw.update(extra)
    return parse_window_def(raw)


def _ev(n: int, time: int, key: str = "k", partition: int = 0, **payload: Any) -> EngineEvent:
    return EngineEvent(
        id=f"e{n}",
        key=key,
        type="t",
        event_time_nanos=time,
        partition=partition,
        tenant="acme",
        payload={"x": 1, **payload},
    )


def test_a_window_is_final_once_the_watermark_passes_its_end() -> None:
    engine = WindowEngine([_def()], CLOCK)
    out = engine.process([_ev(1, 1), _ev(2, 5), _ev(3, 9)], now_nanos=0)
    assert out.results == []
    out = engine.process([_ev(4, 10)], now_nanos=0)
    (final,) = out.results
    assert (final.start_nanos, final.end_nanos, final.revision, final.retracted) == (
        0,
        10,
        0,
        False,
    )
    assert final.values == {"n": 3, "total": 3}
    assert final.identity == ("acme", "tumbling", 1, 0, "k", 0, 10, 0)
    assert out.watermarks == {0: 10}


def test_late_events_within_the_lateness_revise_and_beyond_it_go_to_the_late_output() -> None:
    engine = WindowEngine([_def(allowed_lateness="5ns")], CLOCK)
    engine.process([_ev(1, 2)], now_nanos=0)
    assert [r.revision for r in engine.process([_ev(2, 12)], now_nanos=0).results] == [0]
    revised = engine.process([_ev(3, 3, x=5)], now_nanos=0).results
    assert [(r.revision, r.values["n"], r.values["total"]) for r in revised] == [(1, 2, 6)]
    out = engine.process([_ev(4, 15), _ev(5, 4)], now_nanos=0)
    assert out.results == []
    (late,) = out.late
    assert (late.event_id, late.window_start_nanos, late.window_end_nanos) == ("e5", 0, 10)
    assert (late.watermark_nanos, late.reason) == (15, LATE_BEYOND_ALLOWED_LATENESS)


def test_a_late_event_for_a_window_without_events_emits_its_final() -> None:
    engine = WindowEngine([_def(allowed_lateness="20ns")], CLOCK)
    engine.process([_ev(1, 25)], now_nanos=0)
    (result,) = engine.process([_ev(2, 12)], now_nanos=0).results
    assert (result.start_nanos, result.revision, result.values["n"]) == (10, 0, 1)


def test_hopping_events_count_in_every_window_and_miss_only_the_closed_ones() -> None:
    engine = WindowEngine([_def("hopping", size="30ns", step="10ns")], CLOCK)
    engine.process([_ev(1, 25)], now_nanos=0)
    out = engine.process([_ev(2, 40), _ev(3, 22)], now_nanos=0)
    # Watermark 40 closes e1's [0,30) and [10,40); e3 at 22 misses those two, counts in [20,50).
    assert [(r.start_nanos, r.values["n"]) for r in out.results] == [(0, 1), (10, 1)]
    assert [(e.event_id, e.window_start_nanos) for e in out.late] == [("e3", 0), ("e3", 10)]
    engine.process([], now_nanos=0)
    out = engine.process([], now_nanos=10**6)
    assert [(r.start_nanos, r.values["n"]) for r in out.results] == [(20, 3), (30, 1), (40, 1)]


def test_a_session_extended_after_its_final_is_retracted_and_emitted_anew() -> None:
    engine = WindowEngine([_def("session", allowed_lateness="50ns")], CLOCK)
    engine.process([_ev(1, 0), _ev(2, 5)], now_nanos=0)
    (final,) = engine.process([_ev(3, 40, key="other")], now_nanos=0).results
    assert (final.start_nanos, final.end_nanos, final.values["n"]) == (0, 15, 2)
    # A late event bridges to a new late session: the old bounds are withdrawn.
    out = engine.process([_ev(4, 12)], now_nanos=0)
    retraction, merged = out.results
    assert (retraction.start_nanos, retraction.end_nanos, retraction.revision) == (0, 15, 1)
    assert retraction.retracted and retraction.values == {}
    assert (merged.start_nanos, merged.end_nanos, merged.revision, merged.values["n"]) == (
        0,
        22,
        0,
        3,
    )
    # An event inside the session's bounds revises it in place.
    (revision,) = engine.process([_ev(5, 8)], now_nanos=0).results
    assert (revision.start_nanos, revision.end_nanos, revision.revision) == (0, 22, 1)


def test_a_session_reopened_by_a_merge_is_emitted_when_the_watermark_jumps_past_it() -> None:
    # The property test's falsifying example, reduced: a final [0, 10) schedules its purge at
    # 20; a late event at 2 merges it with [11, 21) into [0, 21), which closes at 21. An idle
    # jump of the watermark past both must emit the merged session, not purge it unemitted.
    engine = WindowEngine([_def("session")], CLOCK)
    engine.process([_ev(1, 0)], now_nanos=0)
    (final,) = engine.process([_ev(2, 11)], now_nanos=0).results
    assert (final.start_nanos, final.end_nanos, final.revision) == (0, 10, 0)
    (retraction,) = engine.process([_ev(3, 2)], now_nanos=0).results
    assert (retraction.start_nanos, retraction.end_nanos, retraction.retracted) == (0, 10, True)
    (merged,) = engine.process([], now_nanos=10**6).results
    assert (merged.start_nanos, merged.end_nanos, merged.revision, merged.retracted) == (
        0,
        21,
        0,
        False,
    )
    assert merged.values == {"n": 3, "total": 3}


def test_an_idle_partition_closes_its_windows_with_processing_time() -> None:
    engine = WindowEngine([_def()], CLOCK)
    engine.process([_ev(1, 3, partition=0), _ev(2, 3, partition=1)], now_nanos=0)
    busy = engine.process([_ev(3, 4, partition=1)], now_nanos=900)
    assert busy.results == []
    # Partition 0 had no event since now=0: after the 1000 ns timeout its watermark moves on
    # with processing time, from 3; partition 1 gets events and stays where they put it.
    out = engine.process([_ev(4, 5, partition=1)], now_nanos=1_006)
    assert out.watermarks == {0: 9, 1: 5} and out.results == []
    (closed,) = engine.process([], now_nanos=1_007).results
    assert (closed.partition, closed.start_nanos, closed.values["n"]) == (0, 0, 1)


def test_group_by_a_payload_field_and_events_without_it() -> None:
    engine = WindowEngine([_def(group_by="payload.region")], CLOCK)
    out = engine.process(
        [
            _ev(1, 1, region="eu"),
            _ev(2, 2, region="us"),
            _ev(3, 3, region=7),
            _ev(4, 4),
            _ev(5, 11),
        ],
        now_nanos=0,
    )
    assert sorted((r.group, r.values["n"]) for r in out.results) == [("7", 1), ("eu", 1), ("us", 1)]
    assert out.ungrouped == 2


def test_definitions_apply_to_their_tenant_and_type_only() -> None:
    engine = WindowEngine([_def()], CLOCK)
    other_tenant = EngineEvent(id="x", key="k", type="t", event_time_nanos=1, tenant="other")
    other_type = EngineEvent(id="y", key="k", type="u", event_time_nanos=2, tenant="acme")
    out = engine.process([other_tenant, other_type, _ev(1, 3), _ev(2, 20)], now_nanos=0)
    assert [r.values["n"] for r in out.results] == [1]


def test_changing_definitions_keeps_unchanged_ones_and_starts_new_versions_empty() -> None:
    first, second = _def(), _def("session")
    engine = WindowEngine([first, second], CLOCK)
    engine.process([_ev(1, 1), _ev(2, 2)], now_nanos=0)
    new_version = parse_window_def({**_raw(second), "version": 2})
    engine.set_definitions([first, new_version])
    out = engine.process([_ev(3, 30)], now_nanos=0)
    assert [(r.window_id, r.window_version, r.values["n"]) for r in out.results] == [
        ("tumbling", 1, 2)
    ]
    # The new version counts from its activation on: only e3.
    out = engine.process([_ev(4, 100)], now_nanos=0)
    assert sorted((r.window_id, r.window_version, r.values["n"]) for r in out.results) == [
        ("session", 2, 1),
        ("tumbling", 1, 1),
    ]


def _raw(definition: Any) -> dict[str, Any]:
    return {
        "id": definition.id,
        "tenant": definition.tenant,
        "event_type": definition.event_type,
        "kind": definition.kind,
        "gap": f"{definition.gap_nanos}ns",
        "aggregates": [
            {"name": a.name, "fn": a.fn, **({"field": a.field} if a.field else {})}
            for a in definition.aggregates
        ],
    }


def test_a_snapshot_of_another_format_is_refused() -> None:
    engine = WindowEngine([_def()], CLOCK)
    with pytest.raises(SnapshotError, match="not a window engine snapshot"):
        engine.restore(0, b"not json")
    with pytest.raises(SnapshotError, match="snapshot format 99"):
        engine.restore(0, b'{"format": 99}')


def test_a_snapshot_drops_state_of_removed_definitions_and_release_forgets_a_partition() -> None:
    engine = WindowEngine([_def(), _def("session")], CLOCK)
    engine.process([_ev(1, 1), _ev(2, 2, partition=3)], now_nanos=0)
    data = engine.snapshot(0)
    fresh = WindowEngine([_def()], CLOCK)
    fresh.restore(0, data)
    (result,) = fresh.process([_ev(3, 50)], now_nanos=0).results
    assert (result.window_id, result.values["n"]) == ("tumbling", 1)
    engine.release(3)
    assert engine.partitions() == [0]


def test_current_views_show_open_windows_without_emitting_them() -> None:
    engine = WindowEngine([_def(), _def("session")], CLOCK)
    engine.process([_ev(1, 1), _ev(2, 4, x=2), _ev(3, 12)], now_nanos=0)
    views = engine.current(0)
    assert [
        (v.window_id, v.start_nanos, v.end_nanos, v.revision, v.values["total"]) for v in views
    ] == [
        ("tumbling", 10, 20, -1, 1),
        ("session", 1, 22, -1, 4),
    ]
    assert engine.process([], now_nanos=0).results == []
