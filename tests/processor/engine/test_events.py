from __future__ import annotations

import pytest

from services.processor.engine.events import (
    MISSING,
    EngineEvent,
    FieldPathError,
    compile_field_path,
)

EVENT = EngineEvent(
    id="e1",
    key="k",
    type="order.created",
    event_time_nanos=5,
    partition=3,
    payload={"amount": 12.5, "customer": {"tier": "gold"}, "nothing": None},
    attributes={"region": "eu"},
)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("id", "e1"),
        ("key", "k"),
        ("type", "order.created"),
        ("event_time", 5),
        ("partition", 3),
        ("payload.amount", 12.5),
        ("payload.customer.tier", "gold"),
        ("payload.nothing", None),
        ("attributes.region", "eu"),
        ("payload.absent", MISSING),
        ("payload.customer.absent", MISSING),
        ("payload.amount.deeper", MISSING),
        ("attributes.absent", MISSING),
    ],
)
def test_paths_read_what_the_event_has(path: str, value: object) -> None:
    read = compile_field_path(path)(EVENT)
    if value is MISSING:
        assert read is MISSING
    else:
        assert read == value


@pytest.mark.parametrize(
    "path", ["", "payload", "payload.", "payload..x", "body.x", "attributes.a.b"]
)
def test_bad_paths_are_refused_naming_the_path(path: str) -> None:
    with pytest.raises(FieldPathError, match="field path"):
        compile_field_path(path)
