"""Storage's batch check has a fast path (a column at a time) and an exact one (event by event,
naming the violations). They must agree on every batch: the fast path may only send a batch to
the exact check, never accept what it would refuse, and both build the same columns."""

from __future__ import annotations

import dataclasses
import json

import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services.storage.batch import (
    Limits,
    _checked_columns,
    _fast_columns,
    _fast_queued_columns,
    batch_columns,
    queued_columns,
)
from streammesh.api.common.v1 import event_pb2
from streammesh.entries import columns_to_batch
from streammesh.mesh.errors import InvalidArgument
from tests.storage.conftest import as_columns

NOW = Timestamp(seconds=1_795_000_000, nanos=123_456_789)


def _queued(**changes: object) -> event_pb2.QueuedEvent:
    queued = event_pb2.QueuedEvent(
        event=event_pb2.Event(id="id-1", key="k", type="t", payload=b"{}"),
        producer="user-1",
        ingest_time=NOW,
    )
    for name, value in changes.items():
        target: Message = queued if name in ("producer", "ingest_time") else queued.event
        if value is None:
            target.ClearField(name)
        elif isinstance(value, Timestamp):
            getattr(target, name).CopyFrom(value)
        elif isinstance(value, dict):
            getattr(target, name).update(value)
        else:
            setattr(target, name, value)
    return queued


CASES: dict[str, dict[str, object]] = {
    "valid": {},
    "with an event time": {"event_time": Timestamp(seconds=1_700_000_000, nanos=5_000)},
    "with attributes": {"attributes": {"region": "eu", "ü": "ß"}},
    "no content type": {"content_type": ""},
    "at every limit": {
        "id": "i" * 128,
        "key": "k" * 256,
        "type": "t" * 128,
        "content_type": "c" * 128,
        "producer": "p" * 256,
    },
    "empty id": {"id": ""},
    "empty key": {"key": ""},
    "empty type": {"type": ""},
    "id too long": {"id": "i" * 129},
    "key too long": {"key": "k" * 257},
    "type too long": {"type": "t" * 129},
    "content type too long": {"content_type": "c" * 129},
    "producer too long": {"producer": "p" * 257},
    "NUL in the id": {"id": "a\x00b"},
    "NUL in the key": {"key": "a\x00b"},
    "NUL in the type": {"type": "\x00"},
    "NUL in the content type": {"content_type": "x\x00"},
    "NUL in the producer": {"producer": "p\x00"},
    "NUL in an attribute": {"attributes": {"a": "b\x00"}},
    "too many attributes": {"attributes": {f"a{i}": "v" for i in range(65)}},
    "payload too large": {"payload": b"x" * (1024 * 1024 + 1)},
    "no ingest time": {"ingest_time": None},
    "ingest time in year 10000": {"ingest_time": Timestamp(seconds=253_402_300_800)},
    "event time before year 1": {"event_time": Timestamp(seconds=-62_135_596_801)},
    "event time nanos out of range": {"event_time": Timestamp(seconds=1, nanos=1_000_000_000)},
    "ingest time nanos negative": {"ingest_time": Timestamp(seconds=1, nanos=-1)},
}


def _batch(bad: event_pb2.QueuedEvent, at: int = 3, size: int = 8) -> event_pb2.QueuedBatch:
    batch = event_pb2.QueuedBatch(partition=2)
    for index in range(size):
        queued = bad if index == at else _queued(id=f"id-{index}")
        batch.events.append(queued)
    return batch


@pytest.mark.parametrize("case", CASES)
def test_the_fast_path_and_the_exact_check_agree(case: str) -> None:
    batch = _batch(_queued(**CASES[case]))
    try:
        exact = _checked_columns(batch, Limits())
    except InvalidArgument as error:
        assert _fast_columns(batch, Limits()) is None, f"the fast path accepted {case}"
        # The violation names the event's position in the batch.
        assert error.field_violations[0][0].startswith("batch.events[3]."), error.field_violations
        with pytest.raises(InvalidArgument):
            batch_columns(batch, Limits())
        return
    fast = _fast_columns(batch, Limits())
    assert fast is not None, f"the fast path sent a valid batch to the slow one: {case}"
    assert fast == exact


def test_columns_keep_batch_order_and_fill_defaults() -> None:
    batch = _batch(_queued(id="id-3", content_type="", event_time=None))
    columns = batch_columns(batch, Limits())
    assert columns.ids == [f"id-{i}" for i in range(8)]
    assert columns.content_types == ["application/json"] * 8
    # No event time: the ingest time stands in, to the microsecond (nanoseconds truncated).
    assert columns.event_times[3] == columns.ingest_times[3]
    assert columns.ingest_times[3] % 1_000_000 == 123_456
    assert columns.event_time_nanos[3] == 0
    assert columns.attributes[3] == "{}"


def test_a_batch_over_the_event_limit_is_refused_before_any_event_is_read() -> None:
    with pytest.raises(InvalidArgument, match="at most 4 events"):
        batch_columns(_batch(_queued(), size=5), Limits(max_batch_events=4))


# QueuedColumns, the queue's columnar form: the same rules, checked a whole column at a time.
# Cases a column cannot express (a missing ingest time, nanoseconds outside a second) are left
# out; the columns' own faults have their own test.
_NOT_COLUMNAR = {"no ingest time", "ingest time nanos negative", "event time nanos out of range"}


@pytest.mark.parametrize("case", [case for case in CASES if case not in _NOT_COLUMNAR])
def test_columns_are_checked_and_bound_as_the_batch_is(case: str) -> None:
    batch = _batch(_queued(**CASES[case]))
    columns = as_columns(batch)
    try:
        expected = batch_columns(batch, Limits())
    except InvalidArgument as refused:
        assert _fast_queued_columns(columns, Limits()) is None, f"the fast path accepted {case}"
        with pytest.raises(InvalidArgument) as caught:
            queued_columns(columns, Limits())
        # The same violations (an event time taken from a bad ingest time is a second one).
        assert set(refused.field_violations) <= set(caught.value.field_violations)
        return
    assert _fast_queued_columns(columns, Limits()) is not None, f"slow path for {case}"
    got = queued_columns(columns, Limits())
    assert [json.loads(a) for a in got.attributes] == [json.loads(a) for a in expected.attributes]
    assert dataclasses.replace(got, attributes=expected.attributes) == expected


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"event_time_nanos": [0] * 7}, "one element per event"),
        ({"run_lengths": [1] * 7}, "one element per event"),
        ({"run_lengths": [2] * 8}, "runs that add up"),
        ({"event_time_nanos": [1000] * 8}, "event_time_nanos outside 0..999"),
        ({"attributes": ["[1]"] * 8}, "not a JSON object of strings"),
        ({"attributes": ['{"a":1}'] * 8}, "not a JSON object of strings"),
        ({"attributes": ["{"] * 8}, "Expecting"),
    ],
)
def test_columns_that_describe_no_events_are_refused(
    fault: dict[str, list[object]], message: str
) -> None:
    columns = as_columns(_batch(_queued()))
    for name, values in fault.items():
        del getattr(columns, name)[:]
        getattr(columns, name).extend(values)
    with pytest.raises(InvalidArgument, match=message):
        queued_columns(columns, Limits())


def test_runs_give_each_event_its_ingest_time_and_producer() -> None:
    columns = as_columns(_batch(_queued(), size=5))
    for name in ("ingest_time_micros", "producers", "run_lengths"):
        del getattr(columns, name)[:]
    columns.ingest_time_micros.extend([1_000_000, 2_000_000])
    columns.producers.extend(["a", "b"])
    columns.run_lengths.extend([2, 3])
    got = queued_columns(columns, Limits())
    assert got.producers == ["a", "a", "b", "b", "b"]
    assert got.ingest_times == [t - 946_684_800_000_000 for t in [1_000_000] * 2 + [2_000_000] * 3]
    assert [q.producer for q in columns_to_batch(columns).events] == got.producers


def test_columns_over_the_event_limit_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="at most 4 events"):
        queued_columns(as_columns(_batch(_queued(), size=5)), Limits(max_batch_events=4))
