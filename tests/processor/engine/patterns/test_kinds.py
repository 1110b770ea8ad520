"""Each rule kind on small hand-made streams: what fires, what does not, and the alert's content."""

from __future__ import annotations

from services.processor.engine.patterns import alert_id
from tests.processor.engine.patterns.helpers import engine_with, event, ids_of, rule

HOT = rule("threshold", match={"type": "reading"}, field="payload.c", op="gt", value=80)


def test_threshold_crossing_fires_once_per_crossing_not_while_above() -> None:
    engine = engine_with(HOT)
    stream = [
        event("1", 1, "reading", c=85),  # first value beyond: a crossing
        event("2", 2, "reading", c=90),  # still above: nothing
        event("3", 3, "reading", c=70),  # below again
        event("4", 4, "reading", c=81),  # crosses again
        event("5", 5, "reading", c="hot"),  # not a number: ignored
        event("6", 6, "other", c=99),  # not matched by the rule
    ]
    alerts = engine.process(stream, 10).alerts
    assert ids_of(alerts) == [("1",), ("4",)]
    first = alerts[0]
    assert (first.rule_id, first.rule_version, first.kind, first.key) == ("r", 1, "threshold", "k")
    assert (first.first_event_time_nanos, first.last_event_time_nanos) == (1, 1)
    assert first.detail == {
        "field": "payload.c",
        "op": "gt",
        "value": 80,
        "mode": "crossing",
        "values": [85],
    }
    assert first.alert_id == alert_id("default", "r", 1, "k", ("1",))
    # A key above the threshold is remembered, a key below is not.
    assert engine.partial_matches() == {"default/r@1": 1}
    engine.process([event("7", 11, "reading", c=1)], 20)
    assert engine.partial_matches() == {"default/r@1": 0}


def test_threshold_level_counts_every_event_beyond_n_times_within() -> None:
    engine = engine_with({**HOT, "mode": "level", "count": 3, "within": "10ns"})
    stream = [event(str(i), t, "reading", c=90) for i, t in enumerate([0, 4, 20, 25, 29, 30])]
    alerts = engine.process(stream, 100).alerts
    # 0 and 4 are too far from 20; 20, 25, 29 are within 10 ns; 30 starts over.
    assert ids_of(alerts) == [("2", "3", "4")]
    assert (alerts[0].first_event_time_nanos, alerts[0].last_event_time_nanos) == (20, 29)


def test_threshold_crossings_n_times_and_per_key() -> None:
    engine = engine_with({**HOT, "op": "lte", "value": 10, "count": 2})
    stream = [
        event("1", 1, "reading", c=5),
        event("2", 2, "reading", key="other", c=5),
        event("3", 3, "reading", c=50),
        event("4", 4, "reading", c=9),
    ]
    alerts = engine.process(stream, 10).alerts
    assert [(a.key, a.event_ids) for a in alerts] == [("k", ("1", "4"))]
    assert alerts[0].detail["values"] == [5, 9]


def test_rate_fires_at_count_within_the_span_and_starts_over() -> None:
    engine = engine_with(rule("rate", match={"type": "fail"}, count=3, within="10ns"))
    times = [0, 5, 11, 12, 13, 14, 15, 16]
    alerts = engine.process([event(str(t), t, "fail") for t in times], 100).alerts
    # 0,5 expire by 11 (11 - 0 > 10); 5,11,12 fit (12 - 5 <= 10); then 13,14,15; 16 alone.
    assert ids_of(alerts) == [("5", "11", "12"), ("13", "14", "15")]
    assert alerts[0].detail == {"count": 3, "within_nanos": 10}


def test_rate_can_group_by_a_payload_field() -> None:
    engine = engine_with(rule("rate", key="payload.ip", count=2, within="1s"))
    stream = [
        event("1", 1, ip="10.0.0.1", key="a"),
        event("2", 2, ip="10.0.0.1", key="b"),
        event("3", 3, key="c"),
    ]
    alerts = engine.process(stream, 10).alerts
    assert [(a.key, a.event_ids) for a in alerts] == [("10.0.0.1", ("1", "2"))]


SEQ = rule(
    "sequence", steps=[{"type": "login"}, {"type": "transfer"}, {"type": "logout"}], within="100ns"
)


def test_relaxed_sequence_allows_other_events_between() -> None:
    engine = engine_with(SEQ)
    stream = [
        event("1", 1, "login"),
        event("2", 2, "view"),
        event("3", 3, "login"),
        event("4", 4, "transfer"),
        event("5", 5, "view"),
        event("6", 6, "logout"),
        event("7", 7, "transfer"),  # the match consumed every partial: no second alert
        event("8", 8, "logout"),
    ]
    alerts = engine.process(stream, 50).alerts
    assert ids_of(alerts) == [("1", "4", "6")]
    assert (alerts[0].first_event_time_nanos, alerts[0].last_event_time_nanos) == (1, 6)
    assert alerts[0].detail == {"steps": 3, "contiguity": "relaxed", "within_nanos": 100}


def test_strict_sequence_breaks_on_another_event_in_scope() -> None:
    engine = engine_with({**SEQ, "contiguity": "strict"})
    stream = [
        event("1", 1, "login"),
        event("2", 2, "view"),  # breaks 1's partial match
        event("3", 3, "login"),
        event("4", 4, "transfer"),
        event("5", 5, "logout"),
    ]
    assert ids_of(engine.process(stream, 50).alerts) == [("3", "4", "5")]


def test_strict_sequence_ignores_events_outside_its_scope_and_other_keys() -> None:
    engine = engine_with(
        {**SEQ, "contiguity": "strict", "scope": {"type": ["login", "transfer", "logout"]}}
    )
    stream = [
        event("1", 1, "login"),
        event("2", 2, "heartbeat"),  # out of scope: invisible
        event("3", 3, "logout", key="someone-else"),  # another key
        event("4", 4, "transfer"),
        event("5", 5, "logout"),
    ]
    assert ids_of(engine.process(stream, 50).alerts) == [("1", "4", "5")]


def test_sequence_must_complete_within_its_span() -> None:
    engine = engine_with({**SEQ, "within": "10ns"})
    stream = [event("1", 0, "login"), event("2", 5, "transfer"), event("3", 11, "logout")]
    assert engine.process(stream, 50).alerts == []
    assert engine.partial_matches() == {"default/r@1": 0}  # the expired partial match is gone


def test_sequence_steps_with_conditions() -> None:
    big = [{"field": "payload.amount", "op": "gte", "value": 1000}]
    engine = engine_with(
        rule("sequence", steps=[{"type": "login"}, {"type": "transfer", "where": big}], within="1s")
    )
    stream = [
        event("1", 1, "login"),
        event("2", 2, "transfer", amount=5),
        event("3", 3, "transfer", amount=5000),
    ]
    assert ids_of(engine.process(stream, 50).alerts) == [("1", "3")]


ORDER_UNPAID = rule("absence", first={"type": "order"}, absent={"type": "payment"}, within="10ns")


def test_absence_fires_when_the_watermark_passes_the_wait_and_not_before() -> None:
    engine = engine_with(ORDER_UNPAID)
    assert engine.process([event("1", 100, "order")], 105).alerts == []
    assert engine.process([], 109).alerts == []
    alerts = engine.process([], 110).alerts
    assert ids_of(alerts) == [("1",)]
    assert (alerts[0].first_event_time_nanos, alerts[0].last_event_time_nanos) == (100, 100)
    assert alerts[0].detail == {"deadline_nanos": 110, "within_nanos": 10}
    assert engine.process([], 500).alerts == []


def test_absence_is_ended_by_the_absent_event_even_at_the_deadline() -> None:
    engine = engine_with(ORDER_UNPAID)
    stream = [
        event("1", 100, "order"),
        event("2", 110, "payment"),  # exactly at the deadline: paid in time
        event("3", 200, "order", key="late-payer"),
        event("4", 211, "payment", key="late-payer"),  # 1 ns too late
        event("5", 300, "order", key="other"),
    ]
    alerts = engine.process(stream, 1000).alerts
    assert [(a.key, a.event_ids) for a in alerts] == [("late-payer", ("3",)), ("other", ("5",))]


def test_absence_each_first_event_waits_on_its_own() -> None:
    engine = engine_with(ORDER_UNPAID)
    alerts = engine.process(
        [event("1", 0, "order"), event("2", 5, "order"), event("3", 12, "payment")], 100
    ).alerts
    assert ids_of(alerts) == [("1",)]  # 1 ran out at 10; 2 was paid at 12 <= 15


def test_rules_see_only_their_tenant() -> None:
    engine = engine_with({**HOT, "tenant": "acme"})
    alerts = engine.process(
        [event("1", 1, "reading", c=99), event("2", 2, "reading", tenant="acme", c=99)], 9
    ).alerts
    assert [(a.tenant, a.event_ids) for a in alerts] == [("acme", ("2",))]
