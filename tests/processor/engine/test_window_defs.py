from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.processor.engine.window_defs import (
    AggregateDef,
    WindowDefError,
    parse_window_defs,
    window_starts,
)

HOPPING: dict[str, Any] = {
    "id": "orders",
    "version": 2,
    "tenant": "acme",
    "event_type": "order.created",
    "kind": "hopping",
    "size": "1m",
    "step": "10s",
    "allowed_lateness": "30s",
    "group_by": "payload.region",
    "aggregates": [
        {"name": "n", "fn": "count"},
        {"name": "p99", "fn": "p99", "field": "payload.amount"},
    ],
}


def test_a_definition_is_read_from_json() -> None:
    (definition,) = parse_window_defs(json.loads(json.dumps({"windows": [HOPPING]})))
    assert definition.identity == "orders@2"
    assert (definition.size_nanos, definition.step_nanos) == (60 * 10**9, 10 * 10**9)
    assert definition.allowed_lateness_nanos == 30 * 10**9
    assert definition.group_by == "payload.region"
    assert definition.aggregates == (
        AggregateDef("n", "count"),
        AggregateDef("p99", "p99", "payload.amount"),
    )


def test_defaults_tumbling_by_key_without_lateness() -> None:
    (definition,) = parse_window_defs(
        [
            {
                "id": "a",
                "tenant": "t",
                "event_type": "e",
                "kind": "tumbling",
                "size": "5s",
                "aggregates": [{"name": "n", "fn": "count"}],
            }
        ]
    )
    assert (definition.version, definition.group_by, definition.allowed_lateness_nanos) == (
        1,
        "key",
        0,
    )
    assert definition.step_nanos == definition.size_nanos


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": "0s"}, r"^windows\[0\]\.size: must be > 0$"),
        ({"size": "ten"}, r"^windows\[0\]\.size: 'ten' is not a duration"),
        ({"size": 10}, r"^windows\[0\]\.size: expected a duration string"),
        ({"step": "2m"}, r"^windows\[0\]\.step: must be <= size"),
        ({"kind": "sliding"}, r"^windows\[0\]\.kind: expected one of"),
        ({"gap": "1s"}, r"^windows\[0\]\.gap: only session windows"),
        ({"version": 0}, r"^windows\[0\]\.version: must be an integer >= 1"),
        ({"tenant": ""}, r"^windows\[0\]\.tenant: required"),
        ({"group_by": "body.x"}, r"^windows\[0\]\.group_by: field path 'body.x'"),
        ({"colour": "red"}, r"^windows\[0\]\.colour: unknown field"),
        ({"aggregates": []}, r"^windows\[0\]\.aggregates: at least one"),
        (
            {"aggregates": [{"name": "x", "fn": "median", "field": "payload.a"}]},
            r"^windows\[0\]\.aggregates\[0\]\.fn: expected one of",
        ),
        (
            {"aggregates": [{"name": "x", "fn": "sum"}]},
            r"^windows\[0\]\.aggregates\[0\]\.field: required",
        ),
        (
            {"aggregates": [{"name": "x", "fn": "count", "field": "payload.a"}]},
            r"^windows\[0\]\.aggregates\[0\]\.field: count takes no field",
        ),
        (
            {"aggregates": [{"name": "x", "fn": "count"}, {"name": "x", "fn": "count"}]},
            r"^windows\[0\]\.aggregates\[1\]\.name: 'x' is used twice",
        ),
        (
            {"aggregates": [{"name": "a b", "fn": "count"}]},
            r"^windows\[0\]\.aggregates\[0\]\.name: 'a b' is not a name",
        ),
    ],
)
def test_errors_name_the_bad_part(change: dict[str, Any], message: str) -> None:
    with pytest.raises(WindowDefError, match=message):
        parse_window_defs({"windows": [{**HOPPING, **change}]})


def test_session_windows_take_a_gap_only() -> None:
    session = {**HOPPING, "kind": "session", "gap": "30s"}
    with pytest.raises(WindowDefError, match=r"^windows\[0\]\.size: a session window has a gap"):
        parse_window_defs([session])
    del session["size"], session["step"]
    (definition,) = parse_window_defs([session])
    assert (definition.gap_nanos, definition.size_nanos) == (30 * 10**9, 0)


def test_one_identity_is_defined_once() -> None:
    with pytest.raises(WindowDefError, match=r"^windows\[1\]\.id: orders@2 is defined twice"):
        parse_window_defs([HOPPING, HOPPING])


@given(
    time=st.integers(-(10**12), 10**12),
    step=st.integers(1, 1_000),
    extra=st.integers(0, 5_000),
)
def test_window_starts_are_every_aligned_window_containing_the_time(
    time: int, step: int, extra: int
) -> None:
    size = step + extra
    starts = window_starts(time, size, step)
    brute = [
        s
        for s in range((time - size) // step * step - step, time + step, step)
        if s <= time < s + size
    ]
    assert list(starts) == brute
    if size % step == 0:
        assert len(starts) == size // step
