"""The request rules of StoreEngineOutputs and the output listings: checking what a processor
sends (each item names its tenant and identity; JSON fields are JSON objects), the protobuf forms
of stored rows, and the output tails' keyset resume tokens (the listings sign theirs:
services/storage/output_listings.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from services.storage import registry
from services.storage.engine_output_store import (
    AlertRow,
    Checkpoint,
    Fence,
    Outputs,
    WindowResultRow,
)
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.mesh.errors import InvalidArgument

__all__ = [
    "MAX_EPOCH",
    "MAX_OUTPUTS",
    "alert_message",
    "checkpoint",
    "checkpoint_message",
    "checkpoint_place",
    "fence",
    "open_position",
    "position_token",
    "result_message",
    "rows",
]

MAX_OUTPUTS = 10_000
"""Items (alerts, results and late events together) in one StoreEngineOutputs call."""
_SOURCES = {common.DEFINITION_KIND_RULE: "rule", common.DEFINITION_KIND_WINDOW: "window"}
_ENTRY_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MAX_STREAM_CHARS = 256
_MAX_PARTITION = 2**31 - 1
MAX_EPOCH = 2**63 - 1
_MAX_ENTRY_PART = 2**64 - 1


def _refuse(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {problem}", field_violations=[(field, problem)])


def _required(value: str, field: str) -> str:
    if not value or "\x00" in value:
        raise _refuse(field, "required, without NUL")
    return value


def _json_object(value: str, field: str) -> Any:
    try:
        parsed = json.loads(value or "{}")
    except ValueError:
        raise _refuse(field, "not JSON") from None
    if not isinstance(parsed, dict):
        raise _refuse(field, "must be a JSON object")
    return parsed


def rows(request: pb.StoreEngineOutputsRequest) -> Outputs:
    """The request's items as table rows, or InvalidArgument naming the first bad one."""
    total = len(request.alerts) + len(request.window_results) + len(request.late_events)
    if total > MAX_OUTPUTS:
        raise _refuse("alerts", f"{total} items; at most {MAX_OUTPUTS} in one call")
    outputs = Outputs()
    for i, alert in enumerate(request.alerts):
        at = f"alerts[{i}]"
        outputs.alerts.append(
            {
                "tenant": _required(alert.tenant, f"{at}.tenant"),
                "alert_id": _required(alert.alert_id, f"{at}.alert_id"),
                "rule_id": _required(alert.rule_id, f"{at}.rule_id"),
                "rule_version": alert.rule_version,
                "rule_kind": alert.rule_kind,
                "key": alert.key,
                "first_event_nanos": alert.first_event_time_unix_nanos,
                "last_event_nanos": alert.last_event_time_unix_nanos,
                "event_ids": list(alert.event_ids),
                "detail": _json_object(alert.detail_json, f"{at}.detail_json"),
            }
        )
    for i, result in enumerate(request.window_results):
        at = f"window_results[{i}]"
        outputs.window_results.append(
            {
                "tenant": _required(result.tenant, f"{at}.tenant"),
                "window_id": _required(result.window_id, f"{at}.window_id"),
                "window_version": result.window_version,
                "partition": result.partition,
                "group_key": result.group,
                "start_nanos": result.start_unix_nanos,
                "end_nanos": result.end_unix_nanos,
                "revision": result.revision,
                "values": _json_object(result.values_json, f"{at}.values_json"),
                "watermark_nanos": result.watermark_unix_nanos,
                "retracted": result.retracted,
            }
        )
    for i, late in enumerate(request.late_events):
        at = f"late_events[{i}]"
        source = _SOURCES.get(late.source)
        if source is None:
            raise _refuse(f"{at}.source", "must be RULE or WINDOW")
        outputs.late_events.append(
            {
                "tenant": _required(late.tenant, f"{at}.tenant"),
                "source": source,
                "definition_id": _required(late.definition_id, f"{at}.definition_id"),
                "definition_version": late.definition_version,
                "event_id": _required(late.event_id, f"{at}.event_id"),
                "window_start_nanos": late.window_start_unix_nanos,
                "window_end_nanos": late.window_end_unix_nanos,
                "event_key": late.event_key,
                "event_time_nanos": late.event_time_unix_nanos,
                "watermark_nanos": late.watermark_unix_nanos,
                "reason": late.reason,
            }
        )
    return outputs


def checkpoint_place(stream: str, partition: int, field: str) -> tuple[str, int]:
    """A checkpoint's (stream, partition), or InvalidArgument naming the bad part."""
    if not stream or "\x00" in stream or len(stream) > _MAX_STREAM_CHARS:
        raise _refuse(f"{field}stream", f"required, at most {_MAX_STREAM_CHARS} characters, no NUL")
    if partition > _MAX_PARTITION:
        raise _refuse(f"{field}partition", f"at most {_MAX_PARTITION}")
    return stream, partition


def _epoch(value: int, field: str) -> int:
    if not 1 <= value <= MAX_EPOCH:
        raise _refuse(field, f"required, 1 to {MAX_EPOCH}")
    return value


def fence(request: pb.StoreEngineOutputsRequest) -> Fence | None:
    """The partition and epoch an outputs-only call is fenced by (None: not fenced)."""
    if not request.HasField("fence"):
        return None
    if request.HasField("checkpoint"):
        raise _refuse("fence", "give a checkpoint or a fence, not both (a checkpoint fences)")
    given = request.fence
    stream, partition = checkpoint_place(given.stream, given.partition, "fence.")
    return Fence(stream, partition, _epoch(given.lease_epoch, "fence.lease_epoch"))


def checkpoint(request: pb.StoreEngineOutputsRequest) -> Checkpoint | None:
    """The request's checkpoint (None without one), or InvalidArgument naming the bad part."""
    if not request.HasField("checkpoint"):
        return None
    given = request.checkpoint
    stream, partition = checkpoint_place(given.stream, given.partition, "checkpoint.")
    _epoch(given.lease_epoch, "checkpoint.lease_epoch")
    match = _ENTRY_ID.match(given.last_entry_id)
    if match is None or max(int(match[1]), int(match[2])) > _MAX_ENTRY_PART:
        raise _refuse("checkpoint.last_entry_id", "required, a stream entry id <ms>-<seq>")
    return Checkpoint(
        stream,
        partition,
        given.lease_epoch,
        given.last_entry_id,
        (int(match[1]), int(match[2])),
        given.snapshot,
    )


def checkpoint_message(saved: Checkpoint) -> pb.EngineCheckpoint:
    message = pb.EngineCheckpoint(
        stream=saved.stream,
        partition=saved.partition,
        lease_epoch=saved.lease_epoch,
        last_entry_id=saved.last_entry_id,
        snapshot=saved.snapshot,
    )
    if saved.saved_at is not None:
        message.save_time.FromDatetime(saved.saved_at)
    return message


def alert_message(row: AlertRow) -> common.Alert:
    message = common.Alert(
        alert_id=row.alert_id,
        tenant=row.tenant,
        rule_id=row.rule_id,
        rule_version=row.rule_version,
        rule_kind=row.rule_kind,
        key=row.key,
        first_event_time_unix_nanos=row.first_event_nanos,
        last_event_time_unix_nanos=row.last_event_nanos,
        event_ids=row.event_ids,
        detail_json=json.dumps(json.loads(row.detail), separators=(",", ":")),
    )
    message.create_time.FromDatetime(row.created_at)
    return message


def result_message(row: WindowResultRow) -> common.WindowResult:
    message = common.WindowResult(
        tenant=row.tenant,
        window_id=row.window_id,
        window_version=row.window_version,
        partition=row.partition,
        group=row.group_key,
        start_unix_nanos=row.start_nanos,
        end_unix_nanos=row.end_nanos,
        revision=row.revision,
        values_json=json.dumps(json.loads(row.values), separators=(",", ":")),
        watermark_unix_nanos=row.watermark_nanos,
        retracted=row.retracted,
    )
    message.emit_time.FromDatetime(row.emitted_at)
    return message


def position_token(position: Sequence[Any], *scope: str) -> str:
    """A page token continuing after a keyset position (a list of column values)."""
    return registry.encode_page_token(json.dumps(list(position)), *scope)


def open_position(token: str, types: Sequence[type], *scope: str) -> list[Any] | None:
    """The position a token continues after (None without a token); InvalidArgument for a token
    this listing did not issue (the tokens are not signed, so every value's type is checked
    before it reaches SQL)."""
    if not token:
        return None
    refused = _refuse("page_token", "not issued for this listing; start again without a token")
    try:
        position = json.loads(registry.decode_page_token(token, str, *scope))
    except ValueError:
        raise refused from None
    if not isinstance(position, list) or len(position) != len(types):
        raise refused
    if any(type(value) is not kind for value, kind in zip(position, types, strict=True)):
        raise refused
    if any(isinstance(value, int) and not -(2**63) <= value < 2**63 for value in position):
        raise refused
    return position
