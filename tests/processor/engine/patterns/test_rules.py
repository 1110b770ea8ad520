"""Rule documents and conditions: what parses, what is refused, and the path each error names."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.processor.engine.events import EngineEvent
from services.processor.engine.patterns import RuleError, parse_duration, parse_rule, parse_rules
from streammesh.definitions.conditions import compile_condition, parse_condition
from streammesh.definitions.rules import SequenceSpec, ThresholdSpec

SEQUENCE = {
    "id": "login-then-payout",
    "version": 2,
    "tenant": "acme",
    "activation": "2026-12-01T12:00:00Z",
    "kind": "sequence",
    "steps": [
        {"type": "login"},
        {"type": "payout", "where": [{"field": "payload.amount", "op": "gt", "value": 100}]},
    ],
    "within": "30s",
    "contiguity": "strict",
}


def test_a_sequence_document_parses_into_its_parts() -> None:
    rule = parse_rule(SEQUENCE)
    assert (rule.id, rule.version, rule.tenant, rule.enabled) == (
        "login-then-payout",
        2,
        "acme",
        True,
    )
    assert rule.activation_nanos == 1_796_126_400_000_000_000
    assert isinstance(rule.spec, SequenceSpec)
    assert rule.spec.within_nanos == 30_000_000_000
    assert rule.spec.steps[0].types == frozenset({"login"})
    assert rule.spec.contiguity == "strict"
    assert rule.source == SEQUENCE


def test_equal_definitions_compare_equal_whatever_their_spelling() -> None:
    assert parse_rule({**SEQUENCE, "within": "30s"}) == parse_rule(
        {**SEQUENCE, "within": "30000ms"}
    )
    assert parse_rule(SEQUENCE) != parse_rule({**SEQUENCE, "within": "31s"})


def test_threshold_defaults() -> None:
    rule = parse_rule(
        {"id": "t", "version": 1, "kind": "threshold", "field": "payload.c", "op": "gt", "value": 3}
    )
    assert isinstance(rule.spec, ThresholdSpec)
    assert (rule.spec.mode, rule.spec.count, rule.spec.within_nanos) == ("crossing", 1, None)
    assert (rule.tenant, rule.activation_nanos, rule.key_field) == ("default", 0, "key")


@pytest.mark.parametrize(
    ("change", "path", "problem"),
    [
        ({"kind": "pattern"}, "rules[0].kind", "must be one of threshold, rate, sequence, absence"),
        ({"within": "30 seconds"}, "rules[0].within", 'must be a duration like "30s"'),
        ({"within": 30}, "rules[0].within", 'must be a duration like "30s"'),
        ({"steps": [{"type": "login"}]}, "rules[0].steps", "two or more"),
        ({"steps": [{"type": "a"}, {"type": []}]}, "rules[0].steps[1].type", "non-empty list"),
        ({"steps": [{"type": "a"}, {"kind": "b"}]}, "rules[0].steps[1].kind", "unknown key"),
        (
            {
                "steps": [
                    {"type": "a"},
                    {"where": [{"field": "payload.x", "op": "like", "value": 1}]},
                ]
            },
            "rules[0].steps[1].where[0].op",
            "must be one of eq, ne",
        ),
        (
            {
                "steps": [
                    {"type": "a"},
                    {"where": {"any": [{"field": "body.x", "op": "eq", "value": 1}]}},
                ]
            },
            "rules[0].steps[1].where.any[0].field",
            "payload.<name>",
        ),
        ({"contiguity": "loose"}, "rules[0].contiguity", "relaxed or strict"),
        ({"version": 0}, "rules[0].version", "positive integer"),
        ({"version": True}, "rules[0].version", "positive integer"),
        ({"id": "has space"}, "rules[0].id", "letters, digits"),
        ({"activation": "2026-12-01T12:00:00"}, "rules[0].activation", "with an offset"),
        ({"enabled": "yes"}, "rules[0].enabled", "true or false"),
        ({"key": "payload."}, "rules[0].key", "field path"),
        ({"count": 3}, "rules[0].count", "unknown key for a sequence rule"),
    ],
)
def test_errors_name_the_bad_part(change: dict[str, Any], path: str, problem: str) -> None:
    document = {**SEQUENCE, **change}
    with pytest.raises(RuleError) as caught:
        parse_rules([document])
    assert caught.value.path == path
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("document", "path"),
    [
        ({"kind": "threshold", "field": "payload.c", "op": "above", "value": 1}, "rules[1].op"),
        ({"kind": "threshold", "field": "payload.c", "op": "gt", "value": "1"}, "rules[1].value"),
        (
            {"kind": "threshold", "field": "payload.c", "op": "gt", "value": 1, "mode": "edge"},
            "rules[1].mode",
        ),
        ({"kind": "threshold", "op": "gt", "value": 1}, "rules[1].field"),
        ({"kind": "rate", "within": "1m"}, "rules[1].count"),
        ({"kind": "rate", "count": -1, "within": "1m"}, "rules[1].count"),
        ({"kind": "absence", "first": {"type": "a"}, "within": "1m"}, "rules[1].absent"),
        ({"kind": "absence", "first": "a", "absent": {}, "within": "1m"}, "rules[1].first"),
    ],
)
def test_kind_specific_errors(document: dict[str, Any], path: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules([SEQUENCE, {"id": "x", "version": 1, **document}])
    assert caught.value.path == path


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("250ms", 250_000_000),
        ("30s", 30 * 10**9),
        ("5m", 300 * 10**9),
        ("2h", 7200 * 10**9),
        ("1d", 86400 * 10**9),
        ("7ns", 7),
    ],
)
def test_durations(text: str, nanos: int) -> None:
    assert parse_duration(text, "within") == nanos


def _holds(condition: Any, **payload: Any) -> bool:
    event = EngineEvent(
        id="e", key="k", type="t", event_time_nanos=1, payload=payload, attributes={"region": "eu"}
    )
    return compile_condition(parse_condition(condition, "where"))(event)


def test_leaf_operators() -> None:
    assert _holds({"field": "payload.n", "op": "gt", "value": 2}, n=3)
    assert not _holds({"field": "payload.n", "op": "gt", "value": 2}, n="3")
    assert not _holds({"field": "payload.n", "op": "gt", "value": 2}, n=True)
    assert _holds({"field": "payload.n", "op": "lte", "value": 2.5}, n=2)
    assert _holds({"field": "payload.s", "op": "lt", "value": "b"}, s="a")
    assert _holds({"field": "payload.n", "op": "eq", "value": 1}, n=1.0)
    assert not _holds({"field": "payload.n", "op": "eq", "value": 1}, n=True)
    assert not _holds({"field": "payload.n", "op": "eq", "value": "1"}, n=1)
    assert _holds({"field": "payload.n", "op": "ne", "value": 1}, n=2)
    assert _holds({"field": "payload.n", "op": "in", "value": [1, 2]}, n=2)
    assert _holds({"field": "payload.n", "op": "not_in", "value": [1, 2]}, n=3)
    assert _holds({"field": "payload.s", "op": "prefix", "value": "ab"}, s="abc")
    assert _holds({"field": "attributes.region", "op": "eq", "value": "eu"})
    assert _holds({"field": "type", "op": "eq", "value": "t"})
    assert _holds({"field": "payload.n", "op": "eq", "value": None}, n=None)


def test_a_missing_field_fails_every_comparison_but_exists_false() -> None:
    for op, value in [
        ("eq", 1),
        ("ne", 1),
        ("gt", 1),
        ("in", [1]),
        ("not_in", [1]),
        ("prefix", "a"),
    ]:
        assert not _holds({"field": "payload.n", "op": op, "value": value}), op
    assert _holds({"field": "payload.n", "op": "exists", "value": False})
    assert not _holds({"field": "payload.n", "op": "exists", "value": True})


def test_composites() -> None:
    big = {"field": "payload.n", "op": "gt", "value": 10}
    even = {"field": "payload.even", "op": "eq", "value": True}
    assert _holds([big, even], n=11, even=True)
    assert not _holds([big, even], n=11, even=False)
    assert _holds({"any": [big, even]}, n=1, even=True)
    assert not _holds({"any": []}, n=1)
    assert _holds({"all": []}, n=1)
    assert _holds({"not": big}, n=1)
    assert _holds({"not": {"any": [big, even]}}, n=1, even=False)


def test_a_document_is_copied_and_must_be_json_data() -> None:
    steps: list[dict[str, Any]] = [{"type": "login"}, {"type": "payout"}]
    rule = parse_rule({**SEQUENCE, "steps": steps})
    steps.append({"type": "more"})
    assert len(rule.source["steps"]) == 2
    with pytest.raises(RuleError) as caught:
        parse_rule({**SEQUENCE, "name": object()})
    assert caught.value.path == "rule"
    # A YAML loader's timestamp is accepted when it has an offset.
    moment = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert (
        parse_rule({**SEQUENCE, "activation": moment}).activation_nanos == 1_796_126_400_000_000_000
    )
