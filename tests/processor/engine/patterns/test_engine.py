"""The engine around the matchers: ordering by event time, late and redelivered events, snapshots,
and what a new rule version, a disabled rule and a removed rule do."""

from __future__ import annotations

import pytest

from services.processor.engine.patterns import (
    PatternEngine,
    PatternEngineConfig,
    RuleSetError,
    SnapshotError,
    parse_rule,
)
from tests.processor.engine.patterns.helpers import engine_with, event, ids_of, rule

SEQ = rule("sequence", steps=[{"type": "a"}, {"type": "b"}], within="50ns")
ABSENCE = rule("absence", rule_id="gone", first={"type": "a"}, absent={"type": "b"}, within="20ns")


def test_events_are_matched_in_event_time_order_once_the_watermark_passes_them() -> None:
    engine = engine_with(SEQ)
    # b arrives first but happened after a.
    assert engine.process([event("2", 20, "b")], 0).alerts == []
    assert engine.process([event("1", 10, "a")], 15).alerts == []
    assert engine.held_events == 1  # b (20) is beyond the watermark (15)
    assert ids_of(engine.process([], 20).alerts) == [("1", "2")]
    assert engine.held_events == 0


def test_an_event_at_or_before_the_watermark_is_late_and_not_matched() -> None:
    engine = engine_with(SEQ)
    engine.process([event("1", 10, "a")], 30)
    output = engine.process([event("2", 30, "b"), event("3", 31, "b")], 40)
    assert [(late.event.id, late.watermark_nanos) for late in output.late] == [("2", 30)]
    assert "watermark" in output.late[0].reason
    assert ids_of(output.alerts) == [("1", "3")]


def test_a_watermark_that_goes_back_is_ignored() -> None:
    engine = engine_with(SEQ)
    engine.process([], 100)
    engine.process([], 5)
    assert engine.watermark_nanos == 100
    assert len(engine.process([event("1", 50, "a")], 5).late) == 1


def test_a_redelivered_batch_raises_no_alert_twice() -> None:
    engine = engine_with(SEQ, ABSENCE)
    batch = [event("1", 10, "a"), event("2", 20, "b"), event("3", 25, "a"), event("4", 90, "b")]
    first = engine.process(batch, 60)
    assert ids_of(first.alerts) == [("1", "2"), ("3",)]
    again = engine.process(batch, 60)  # held (4) and matched (1, 2, 3) events alike
    assert again.alerts == [] and again.late == []
    assert sorted(again.duplicate_ids) == ["1", "2", "3", "4"]
    assert engine.process(batch, 100).alerts == []


def test_redelivery_after_restoring_a_snapshot_raises_nothing_twice() -> None:
    engine = engine_with(SEQ)
    batch = [event("1", 10, "a"), event("2", 20, "b")]
    assert len(engine.process(batch, 30).alerts) == 1
    restored = PatternEngine.restore(engine.snapshot())
    assert restored.process(batch, 30).alerts == []


def test_past_the_dedupe_window_a_redelivered_matched_event_is_late_and_still_not_matched() -> None:
    engine = PatternEngine(PatternEngineConfig(dedupe_batches=2))
    engine.apply_rules([parse_rule(SEQ)])
    assert len(engine.process([event("1", 10, "a"), event("2", 20, "b")], 50).alerts) == 1
    assert engine.process([event("1", 10, "a")], 50).duplicate_ids == ["1"]
    for mark in range(51, 60):
        engine.process([], mark)  # idle ticks do not count
    assert engine.process([event("2", 20, "b")], 60).duplicate_ids == ["2"]
    engine.process([event("3", 61, "c")], 70)
    engine.process([event("4", 71, "c")], 80)
    output = engine.process([event("1", 10, "a"), event("2", 20, "b")], 80)
    assert [late.event.id for late in output.late] == ["1", "2"]
    assert output.alerts == []


def test_a_held_event_is_a_duplicate_however_long_ago_it_came() -> None:
    engine = PatternEngine(PatternEngineConfig(dedupe_batches=1))
    engine.apply_rules([parse_rule(SEQ)])
    engine.process([event("1", 100, "a")], 0)
    for mark in range(1, 5):
        engine.process([], mark)
    assert engine.process([event("1", 100, "a")], 5).duplicate_ids == ["1"]
    assert engine.held_events == 1


def test_a_snapshot_keeps_held_events_partial_matches_and_timers() -> None:
    engine = engine_with(SEQ, ABSENCE)
    engine.process([event("1", 10, "a"), event("9", 70, "b", key="later")], 15)
    data = engine.snapshot()
    restored = PatternEngine.restore(data)
    assert restored.snapshot() == data
    assert restored.held_events == 1 and restored.watermark_nanos == 15
    assert (
        restored.partial_matches()
        == engine.partial_matches()
        == {"default/r@1": 1, "default/gone@1": 1}
    )
    tail = [event("2", 40, "b")]
    assert restored.process(tail, 100).alerts == engine.process(tail, 100).alerts


def test_restore_refuses_what_is_not_a_snapshot() -> None:
    with pytest.raises(SnapshotError, match="not JSON"):
        PatternEngine.restore(b"\x00not json")
    with pytest.raises(SnapshotError, match="format 1"):
        PatternEngine.restore(b'{"format": 99}')


def test_state_per_key_is_dropped_when_its_partial_matches_expire() -> None:
    engine = engine_with(SEQ, rule("rate", rule_id="many", count=99, within="50ns"))
    engine.process([event(str(i), i, "a", key=f"k{i}") for i in range(100)], 100)
    # Matches started at 50 or before can no longer complete after 100: swept already.
    assert engine.partial_matches() == {"default/r@1": 49, "default/many@1": 49}
    engine.process([], 1000)
    assert engine.partial_matches() == {"default/r@1": 0, "default/many@1": 0}
    assert len(engine.snapshot()) < 2000


V1 = rule("sequence", steps=[{"type": "a"}, {"type": "b"}], within="100ns")
V2 = {**V1, "version": 2, "activation": 50, "steps": [{"type": "a"}, {"type": "c"}]}


def test_a_new_version_starts_at_its_activation_while_the_old_one_finishes_what_it_started() -> (
    None
):
    engine = engine_with(V1)
    engine.process([event("1", 10, "a")], 20)  # v1 half-matched
    engine.apply_rules([parse_rule(V2)])  # the rule service sends only the newest version
    stream = [
        event("2", 49, "a", key="before"),  # before the activation: v1 starts a match
        event("3", 55, "b"),  # v1 completes 1 -> 3
        event("4", 56, "a", key="new"),  # after: only v2 starts matches
        event("5", 57, "b", key="new"),  # v1 may not start, so no v1 alert
        event("6", 58, "c", key="new"),  # v2 completes 4 -> 6
        event("7", 60, "b", key="before"),  # v1 completes the match it started before 50
    ]
    alerts = engine.process(stream, 100).alerts
    assert [(a.rule_version, a.event_ids) for a in alerts] == [
        (1, ("1", "3")),
        (2, ("4", "6")),
        (1, ("2", "7")),
    ]
    # Drained: the old version is gone once it holds no partial match.
    assert engine.partial_matches() == {"default/r@2": 0}


def test_an_old_version_s_partial_match_expires_by_its_own_span() -> None:
    engine = engine_with(V1)
    engine.process([event("1", 10, "a")], 20)
    engine.apply_rules([parse_rule(V1), parse_rule(V2)])
    engine.process([], 110)
    assert "default/r@1" in engine.partial_matches()
    assert engine.process([event("2", 120, "b")], 130).alerts == []  # 120 - 10 > 100
    assert engine.partial_matches() == {"default/r@2": 0}


def test_a_version_whose_activation_has_passed_starts_after_the_watermark() -> None:
    engine = engine_with(V1)
    engine.process([event("1", 60, "a"), event("2", 61, "c")], 70)
    engine.apply_rules([parse_rule(V2)])  # activation 50 < watermark 70: not retroactive
    alerts = engine.process([event("3", 71, "a"), event("4", 72, "c")], 100).alerts
    assert [(a.rule_version, a.event_ids) for a in alerts] == [(2, ("3", "4"))]


def test_a_disabled_version_drops_partial_state_at_its_activation() -> None:
    engine = engine_with(V1, ABSENCE)
    engine.process([event("1", 10, "a"), event("2", 11, "a", key="x")], 20)
    disabled = [
        {**V1, "version": 2, "enabled": False, "activation": 30},
        {**ABSENCE, "version": 2, "enabled": False, "activation": 25},
    ]
    engine.apply_rules([parse_rule(d) for d in disabled])
    # The absence of 1 was due at 30, after the rule was disabled (25): it never fires.
    alerts = engine.process([event("3", 29, "b", key="x"), event("4", 40, "b")], 100).alerts
    # Before 30, rule r still matched x: 2 -> 3. After, nothing: 1 -> 4 would have matched.
    assert [(a.rule_id, a.event_ids) for a in alerts] == [("r", ("2", "3"))]
    assert engine.partial_matches() == {}


def test_a_disabled_rule_still_fires_absences_due_before_it_stops() -> None:
    engine = engine_with(ABSENCE)
    engine.process([event("1", 10, "a")], 15)
    engine.apply_rules([parse_rule({**ABSENCE, "version": 2, "enabled": False, "activation": 31})])
    assert ids_of(engine.process([], 100).alerts) == [("1",)]


def test_a_rule_left_out_of_the_set_is_dropped_with_its_state() -> None:
    engine = engine_with(V1, ABSENCE)
    engine.process([event("1", 10, "a")], 15)
    engine.apply_rules([parse_rule(ABSENCE)])
    assert engine.partial_matches() == {"default/gone@1": 1}
    assert engine.process([event("2", 20, "b")], 50).alerts == []


def test_applying_the_same_rules_again_keeps_their_state() -> None:
    engine = engine_with(V1)
    engine.process([event("1", 10, "a")], 15)
    engine.apply_rules([parse_rule(V1)])
    assert ids_of(engine.process([event("2", 20, "b")], 50).alerts) == [("1", "2")]


def test_contradictory_rule_sets_are_refused_and_change_nothing() -> None:
    engine = engine_with(V1)
    engine.process([event("1", 10, "a")], 15)
    with pytest.raises(RuleSetError, match="changed; a change is a new version"):
        engine.apply_rules([parse_rule({**V1, "within": "1s"})])
    with pytest.raises(RuleSetError, match="given twice"):
        engine.apply_rules([parse_rule(V2), parse_rule({**V2, "within": "1s"})])
    with pytest.raises(RuleSetError, match="must not activate earlier"):
        engine.apply_rules(
            [parse_rule(V1), parse_rule(V2), parse_rule({**V2, "version": 3, "activation": 10})]
        )
    assert ids_of(engine.process([event("2", 20, "b")], 50).alerts) == [("1", "2")]


def test_an_old_version_starts_nothing_after_the_activation_even_on_a_key_it_is_matching() -> None:
    engine = engine_with(V1)
    engine.process([event("1", 10, "a")], 20)
    engine.apply_rules([parse_rule(V2)])
    # 2 (after 50) may not start a v1 match beside 1's; 1 expires at 110, so 3 completes nothing.
    alerts = engine.process([event("2", 60, "a"), event("3", 115, "b")], 200).alerts
    assert [(a.rule_version, a.event_ids) for a in alerts] == []


def test_an_old_rate_window_drains_even_under_a_steady_stream() -> None:
    old = rule("rate", count=100, within="10ns")
    engine = engine_with(old)
    engine.process([event("0", 45, "a")], 46)
    engine.apply_rules([parse_rule({**old, "version": 2, "activation": 50, "count": 1000})])
    # One event per ns for ever: v1's window slides on, but it only counts while it still
    # holds an event from before 50, so v1 is gone by 56 (45 + 10 < 56).
    engine.process([event(str(t), t, "a") for t in range(50, 200)], 200)
    assert engine.partial_matches() == {"default/r@2": 1}
