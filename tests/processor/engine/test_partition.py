"""The per-partition engine: windows and rules together on one partition's watermark, late events
for both, idle advancement by the processing time given, definition changes, the lazy payload,
and the snapshot: versioned, refused when foreign, and a restore at any point (with any batching
after it) gives the outputs of the uninterrupted run."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.processor.engine.clock import ClockConfig
from services.processor.engine.events import EngineEvent
from services.processor.engine.partition import (
    PartitionEngine,
    PartitionOutputs,
    SnapshotError,
    entry_id_key,
)
from services.processor.engine.patterns import parse_rule
from services.processor.engine.payload import LazyPayload
from services.processor.engine.window_defs import parse_window_def
from streammesh.definitions.rules import Rule
from streammesh.definitions.window_defs import WindowDef

CLOCK = ClockConfig(out_of_orderness_nanos=10, idle_timeout_nanos=1_000)
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def windows() -> list[WindowDef]:
    common: dict[str, Any] = {"tenant": "acme", "event_type": "a", "allowed_lateness": "20ns"}
    count = [
        {"name": "n", "fn": "count"},
        {"name": "total", "fn": "sum", "field": "payload.v"},
        {"name": "p50", "fn": "p50", "field": "payload.v"},
    ]
    return [
        parse_window_def(
            {"id": "tumble", "kind": "tumbling", "size": "50ns", "aggregates": count, **common}
        ),
        parse_window_def(
            {
                "id": "hop",
                "kind": "hopping",
                "size": "60ns",
                "step": "20ns",
                "group_by": "payload.g",
                "aggregates": count,
                **common,
            }
        ),
        parse_window_def(
            {"id": "visits", "kind": "session", "gap": "15ns", "aggregates": count, **common}
        ),
    ]


def rules() -> list[Rule]:
    documents: list[dict[str, Any]] = [
        {
            "id": "hot",
            "kind": "threshold",
            "match": {"type": "a"},
            "field": "payload.v",
            "op": "gt",
            "value": 7,
        },
        {"id": "burst", "kind": "rate", "match": {"type": "b"}, "count": 3, "within": "30ns"},
        {"id": "a-then-b", "kind": "sequence", "steps": [{"type": "a"}, {"type": "b"}]}
        | {"within": "40ns"},
        {
            "id": "unanswered",
            "kind": "absence",
            "first": {"type": "b"},
            "absent": {"type": "c"},
            "within": "25ns",
        },
    ]
    return [parse_rule({"version": 1, "tenant": "acme", **d}) for d in documents]


def event(n: int, t: int, kind: str = "a", key: str = "k1", **payload: Any) -> EngineEvent:
    return EngineEvent(
        id=f"e{n:03d}",
        key=key,
        type=kind,
        event_time_nanos=t,
        partition=3,
        tenant="acme",
        payload=payload,
    )


def engine() -> PartitionEngine:
    return PartitionEngine(3, CLOCK, windows(), rules())


def comparable(outputs: list[PartitionOutputs], *, exact: bool) -> Any:
    """Outputs of a run; `exact` keeps the emission order (same batching), otherwise alerts
    are compared as a set (their order among one batch's matches follows the batch)."""
    results = [r for o in outputs for r in o.window_results]
    late = [x for o in outputs for x in o.window_late]
    rule_late = sorted(x for o in outputs for x in o.rule_late)
    alerts = [a for o in outputs for a in o.alerts]
    if not exact:
        alerts = sorted(alerts, key=lambda a: a.alert_id)
    return results, late, rule_late, alerts


def test_windows_and_rules_share_the_partition_watermark() -> None:
    engine_ = engine()
    out = engine_.process(
        [event(1, 5, v=9), event(2, 12, "b"), event(3, 70, v=1)], 0, last_entry_id="1-0"
    )
    assert out.watermark_nanos == 60 == engine_.watermark_nanos
    assert {a.rule_id for a in out.alerts} == {"hot", "a-then-b", "unanswered"}
    sequence = next(a for a in out.alerts if a.rule_id == "a-then-b")
    assert sequence.event_ids == ("e001", "e002") and sequence.rule_version == 1
    # Tumbling [0, 50) is not final yet at watermark 60 (it closes at its end: 50 <= 60).
    tumble = [r for r in out.window_results if r.window_id == "tumble"]
    assert [(r.start_nanos, r.revision, r.values["n"]) for r in tumble] == [(0, 0, 1)]
    # A late "a" at 20: within the allowed lateness it revises [0, 50); the rules call it late.
    late = engine_.process([event(4, 20, v=2)], 0, last_entry_id="2-0")
    revised = [r for r in late.window_results if r.window_id == "tumble"]
    assert [(r.revision, r.values["n"]) for r in revised] == [(1, 2)]
    assert [(x.rule_id, x.event_id, x.watermark_nanos) for x in late.rule_late] == [
        ("hot", "e004", 60),
        ("a-then-b", "e004", 60),
    ]
    assert engine_.last_entry_id == "2-0"


def test_lateness_is_judged_per_event_not_per_batch() -> None:
    # In one batch: 100 moves the watermark to 90, so the "a" at 30 after it is late for the
    # rules, as it is when the two come in two batches.
    together = engine().process([event(1, 100), event(2, 30)], 0)
    apart = engine()
    first = apart.process([event(1, 100)], 0)
    second = apart.process([event(2, 30)], 0)
    assert together.rule_late == first.rule_late + second.rule_late
    assert [x.event_id for x in together.rule_late] == ["e002", "e002"]


def test_an_idle_partition_advances_with_the_processing_time_given() -> None:
    engine_ = engine()
    engine_.process([event(1, 5, g="x")], now_nanos=0)
    assert engine_.process([], now_nanos=900).window_results == []
    # 1,000 ns idle timeout, then one-for-one with processing time from watermark -5 (5 - 10).
    out = engine_.process([], now_nanos=1_100)
    assert out.watermark_nanos == 95
    assert {r.window_id for r in out.window_results} == {"tumble", "hop", "visits"}


def test_an_event_of_another_partition_is_refused() -> None:
    stray = EngineEvent(id="x", key="k", type="a", event_time_nanos=1, partition=0)
    with pytest.raises(ValueError, match="partition 0, not 3"):
        engine().process([stray], 0)


def test_a_new_rule_version_and_a_disabled_window() -> None:
    engine_ = engine()
    engine_.process([event(1, 5, "a"), event(2, 30, "a")], 0)
    hot2 = parse_rule(
        {"id": "hot", "version": 2, "tenant": "acme", "kind": "threshold", "activation": 40}
        | {"match": {"type": "a"}, "field": "payload.v", "op": "gt", "value": 100}
    )
    kept = [w for w in windows() if w.id != "visits"]
    engine_.set_definitions(kept, [*rules(), hot2])
    assert [w.id for w in engine_.window_definitions] == ["tumble", "hop"]
    batch = [event(3, 35, v=50), event(4, 45, v=50), event(5, 200, v=500), event(6, 300)]
    out = engine_.process(batch, 0)
    # The rules match an event once the watermark (290) has passed it.
    hot = sorted((a.rule_version, a.event_ids) for a in out.alerts if a.rule_id == "hot")
    # Version 1 up to its successor's activation (40), version 2 from then on.
    assert hot == [(1, ("e003",)), (2, ("e005",))]
    assert "visits" not in {r.window_id for r in out.window_results}


def test_the_payload_is_parsed_only_when_read() -> None:
    unread = LazyPayload(b'{"v": 9}')
    read = LazyPayload(b'{"v": 9}')
    engine().process(
        [
            EngineEvent("u", "k", "other", 5, partition=3, tenant="acme", payload=unread),
            EngineEvent("r", "k", "a", 6, partition=3, tenant="acme", payload=read),
        ],
        0,
    )
    assert not unread.parsed and read.parsed and read == {"v": 9}
    assert dict(LazyPayload(b"[1, 2]")) == {} and dict(LazyPayload(b"not json")) == {}


def test_foreign_snapshots_are_refused() -> None:
    data = engine().snapshot()
    with pytest.raises(SnapshotError, match="partition 3, not 4"):
        PartitionEngine.restore(data, CLOCK, partition=4)
    with pytest.raises(SnapshotError, match="format 9"):
        PartitionEngine.restore(data[:4] + b"\x00\x09" + data[6:], CLOCK)
    for bad in (b"", b"SMPEjunk", data[:-1], data + b"x", orjson.dumps({"format": 1})):
        with pytest.raises(SnapshotError):
            PartitionEngine.restore(bad, CLOCK)


def test_entry_ids_compare_in_stream_order() -> None:
    assert entry_id_key("") < entry_id_key("0-1") < entry_id_key("9-0") < entry_id_key("10-0")
    with pytest.raises(ValueError, match="milliseconds"):
        entry_id_key("10")


@st.composite
def streams(draw: st.DrawFn) -> list[EngineEvent]:
    count = draw(st.integers(1, 60))
    t = 0
    events: list[EngineEvent] = []
    for n in range(count):
        if events and draw(st.integers(0, 6)) == 0:
            # A repeat of an earlier event (same id and content: a publish retried beyond
            # ingest's idempotency window), mostly soon after it, sometimes much later.
            back = draw(st.integers(1, min(len(events), 40)))
            events.append(events[-back])
            continue
        # Mostly forward, sometimes back by more than the lateness bounds: on time, out of
        # order, revising and beyond the allowed lateness.
        step = (
            -draw(st.integers(0, 45)) if draw(st.integers(0, 4)) == 0 else draw(st.integers(0, 12))
        )
        t = max(0, t + step)
        payload: dict[str, Any] = {"g": draw(st.sampled_from(["x", "y"]))}
        if draw(st.booleans()):
            payload["v"] = draw(st.integers(0, 10))
        kind = draw(st.sampled_from(["a", "a", "b", "c"]))
        events.append(event(n, t, kind, draw(st.sampled_from(["k1", "k2"])), **payload))
    return events


def cuts(data: st.DataObject, length: int) -> list[int]:
    return sorted(set(data.draw(st.lists(st.integers(0, length), max_size=6))) | {0, length})


def run(engine_: PartitionEngine, events: list[EngineEvent], bounds: list[int], now: int) -> Any:
    return [
        engine_.process(events[a:b], now, last_entry_id=f"{b}-0")
        for a, b in itertools.pairwise(bounds)
    ]


@SETTINGS
@given(streams(), st.data())
def test_restoring_at_any_point_gives_the_uninterrupted_outputs(
    events: list[EngineEvent], data: st.DataObject
) -> None:
    split = data.draw(st.integers(0, len(events)), label="split")
    head = cuts(data, split)
    tail = [split + c for c in cuts(data, len(events) - split)]
    # Idle polls between batches (processing time past the timeout) in both runs alike.
    idle = data.draw(st.booleans(), label="idle")
    now = 5_000 if idle else 0

    uninterrupted = engine()
    run(uninterrupted, events, head, 0)
    saved = uninterrupted.snapshot()
    reference = run(uninterrupted, events, tail, 0)

    restored = PartitionEngine.restore(saved, CLOCK, windows(), rules(), partition=3)
    assert restored.snapshot() == saved  # deterministic: the same state, the same bytes
    assert restored.last_entry_id == (f"{split}-0" if split else "")
    continued = run(restored, events, tail, 0)
    assert comparable(continued, exact=True) == comparable(reference, exact=True)
    assert restored.snapshot() == uninterrupted.snapshot()

    # A run that never took a snapshot (a snapshot sweeps expired partial matches, which
    # changes no output).
    never = engine()
    run(never, events, head, 0)
    assert comparable(run(never, events, tail, 0), exact=False) == comparable(
        reference, exact=False
    )
    # Other batches after the restore (a new owner reads differently): the same outputs.
    rebatched = PartitionEngine.restore(saved, CLOCK, windows(), rules())
    other = [split + c for c in cuts(data, len(events) - split)]
    again = run(rebatched, events, other, 0)
    assert comparable(again, exact=False) == comparable(reference, exact=False)
    # And idle advancement after the restore behaves as it does without one.
    if idle:
        assert comparable([restored.process([], 0), restored.process([], now)], exact=True) == (
            comparable([uninterrupted.process([], 0), uninterrupted.process([], now)], exact=True)
        )
