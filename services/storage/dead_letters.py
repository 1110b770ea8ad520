"""Dead-letter requests and replies: validation and protobuf <-> row translation for the
StoreDeadLetter, ListDeadLetters, GetDeadLetter and MarkDeadLetterReplayed handlers.

StoreDeadLetter is how the processor gets rid of an entry nothing else can store, so it must not
refuse a record for its *content*: a refusal would leave the entry pending and its partition
blocked. Only the identity of the record (stream, partition, entry id) and a batch that does not
decode are refused; text that Postgres cannot hold (NUL characters) is replaced, and the error
text is cut to a bounded length.
"""

from __future__ import annotations

import datetime as dt
import re

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from services.storage.batch import MAX_PARTITION
from services.storage.dead_letter_store import (
    DeadLetterBody,
    DeadLetterQuery,
    DeadLetterRow,
    NewDeadLetter,
)
from streammesh.api.common.v1 import event_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.envelope import timestamp_in_range
from streammesh.mesh.errors import InvalidArgument
from streammesh.mesh.paging import page_size
from streammesh.mesh.tenancy import DEFAULT_TENANT, canonical_tenant

__all__ = [
    "DEFAULT_DEAD_LETTER_PAGE",
    "MAX_DEAD_LETTER_PAGE",
    "MAX_ERROR_CHARS",
    "dead_letter_message",
    "get_response",
    "list_query",
    "new_dead_letter",
    "replayed_by",
]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

DEFAULT_DEAD_LETTER_PAGE = 100
MAX_DEAD_LETTER_PAGE = 500
MAX_ERROR_CHARS = 4000
"""Longer error texts are cut (the processor cuts its own at 2000)."""
_MAX_NAME_CHARS = 256
_MAX_COUNT = 2**31 - 1
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _clean(text: str) -> str:
    return text.replace("\x00", "\ufffd")


def _name_problem(value: str) -> str | None:
    if not value:
        return "required"
    if len(value) > _MAX_NAME_CHARS:
        return f"longer than {_MAX_NAME_CHARS} characters"
    if "\x00" in value:
        return "contains a NUL character"
    return None


def _time(
    value: timestamp_pb2.Timestamp, has: bool, field: str, now: dt.datetime
) -> tuple[dt.datetime, tuple[str, str] | None]:
    if not has:
        return now, None
    if not timestamp_in_range(value.seconds, value.nanos):
        return now, (field, "outside 0001-01-01..9999-12-31 or nanos out of range")
    return EPOCH + dt.timedelta(seconds=value.seconds, microseconds=value.nanos // 1000), None


def new_dead_letter(request: storage_pb2.StoreDeadLetterRequest) -> NewDeadLetter:
    """The row to insert, in the tenant its batch names ("default" for a batch written before
    tenants, or without a batch); InvalidArgument naming every field that cannot be stored."""
    problems: list[tuple[str, str]] = []
    for name, value in (("stream", request.stream), ("entry_id", request.entry_id)):
        reason = _name_problem(value)
        if reason is not None:
            problems.append((name, reason))
    if request.entry_id and not _ENTRY_ID.fullmatch(request.entry_id):
        problems.append(("entry_id", "not a stream entry id (<milliseconds>-<sequence>)"))
    if request.partition > MAX_PARTITION:
        problems.append(("partition", f"larger than {MAX_PARTITION}"))
    tenant = DEFAULT_TENANT
    if request.batch:
        try:
            # A malformed tenant is content, not identity: the record goes to "default".
            named = event_pb2.QueuedBatch.FromString(request.batch).tenant
            tenant = canonical_tenant(named) or DEFAULT_TENANT
        except DecodeError:
            problems.append(("batch", "not a serialized streammesh.common.v1.QueuedBatch"))
    now = dt.datetime.now(dt.UTC)
    first, first_problem = _time(
        request.first_failed_at, request.HasField("first_failed_at"), "first_failed_at", now
    )
    last, last_problem = _time(
        request.last_failed_at, request.HasField("last_failed_at"), "last_failed_at", now
    )
    problems += [p for p in (first_problem, last_problem) if p is not None]
    if problems:
        field, reason = problems[0]
        raise InvalidArgument(
            f"{len(problems)} invalid field(s); first: {field}: {reason}",
            field_violations=problems,
        )
    return NewDeadLetter(
        tenant=tenant,
        stream=request.stream,
        partition=request.partition,
        entry_id=request.entry_id,
        event_ids=tuple(_clean(event_id) for event_id in request.event_ids),
        batch=request.batch or None,
        raw_fields=tuple((f.name, f.value) for f in request.raw_fields) or None,
        error=_clean(request.error[:MAX_ERROR_CHARS]),
        delivery_count=min(request.delivery_count, _MAX_COUNT),
        first_failed_at=min(first, last),
        last_failed_at=last,
    )


def list_query(
    request: storage_pb2.ListDeadLettersRequest, tenant: str
) -> tuple[DeadLetterQuery, int]:
    """The filter (inside `tenant`, the caller's) and the page size of a listing."""
    size = page_size(
        request.page_size, default=DEFAULT_DEAD_LETTER_PAGE, maximum=MAX_DEAD_LETTER_PAGE
    )
    partition = request.partition if request.HasField("partition") else None
    if partition is not None and partition > MAX_PARTITION:
        raise InvalidArgument(
            "partition is out of range",
            field_violations=[("partition", f"larger than {MAX_PARTITION}")],
        )
    replayed = request.replayed if request.HasField("replayed") else None
    query = DeadLetterQuery(tenant=tenant, partition=partition, replayed=replayed)
    return query, size


def replayed_by(request: storage_pb2.MarkDeadLetterReplayedRequest) -> str:
    """Who replayed, checked."""
    reason = _name_problem(request.replayed_by)
    if reason is not None:
        raise InvalidArgument(f"replayed_by: {reason}", field_violations=[("replayed_by", reason)])
    return request.replayed_by


def _set_time(target: timestamp_pb2.Timestamp, value: dt.datetime) -> None:
    if value.tzinfo is None:
        # asyncpg's datetime codec writes the first and last microsecond of the range as
        # -infinity/infinity and reads those back as naive datetime.min/max: the same instants,
        # in UTC (not a crash of every page that holds one).
        value = value.replace(tzinfo=dt.UTC)
    micros = (value - EPOCH) // dt.timedelta(microseconds=1)
    target.seconds, remainder = divmod(micros, 1_000_000)
    target.nanos = remainder * 1000


def dead_letter_message(row: DeadLetterRow) -> storage_pb2.DeadLetter:
    message = storage_pb2.DeadLetter(
        id=row.id,
        stream=row.stream,
        partition=row.partition,
        entry_id=row.entry_id,
        event_ids=row.event_ids,
        error=row.error,
        delivery_count=row.delivery_count,
        replay_count=row.replay_count,
        replayed_by=row.replayed_by,
        has_batch=row.has_batch,
    )
    _set_time(message.first_failed_at, row.first_failed_at)
    _set_time(message.last_failed_at, row.last_failed_at)
    _set_time(message.created_at, row.created_at)
    if row.replayed_at is not None:
        _set_time(message.replayed_at, row.replayed_at)
    return message


def get_response(row: DeadLetterRow, body: DeadLetterBody) -> storage_pb2.GetDeadLetterResponse:
    """The dead letter with its events decoded (StoreDeadLetter only keeps batches that decode)."""
    response = storage_pb2.GetDeadLetterResponse(
        dead_letter=dead_letter_message(row),
        raw_fields=[
            storage_pb2.RawField(name=name, value=value) for name, value in body.raw_fields
        ],
    )
    if body.batch is not None:
        response.events.extend(event_pb2.QueuedBatch.FromString(body.batch).events)
    return response
