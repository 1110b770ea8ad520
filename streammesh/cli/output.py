"""How the CLI prints replies: tables for people, `--json` with every field for scripts.

People get one table per list of records (tenants, users, keys, audit events, dead letters,
events, aggregate groups), and
`name: value` lines for everything else; a next page is announced on stderr so that the rows on
stdout stay clean for `head`, `grep` or `awk`.

Scripts get `--json`: the whole reply with every field, false, zero and empty ones included (proto3
leaves them out of its JSON by default, so a disabled=false user would look like one without the
field), and unset optional fields as null, so every record of a type has the same keys.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tabulate import tabulate

from streammesh.api.common.v1 import definitions_pb2 as common_definitions
from streammesh.api.common.v1 import schema_registry_pb2 as common_schemas

__all__ = ["print_reply", "reply_to_dict"]

Field = Any
"""A field descriptor: the pure-Python or the upb class, depending on the protobuf backend
(their stubs differ, so typed helpers would refuse one of them)."""


@dataclass(frozen=True)
class Column:
    """One column of a record table: its header and how a record's cell is drawn."""

    header: str
    cell: Callable[[Any], str]


def _time(value: timestamp_pb2.Timestamp, present: bool = True) -> str:
    if not present:
        return "-"
    return value.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _set_time(record: Message, field: str) -> str:
    return _time(getattr(record, field), record.HasField(field))


def _nanos_time(nanos: int) -> str:
    """An event time in nanoseconds since the epoch, as UTC to the second (nanos kept in --json)."""
    return datetime.fromtimestamp(nanos / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _missed(event: Any) -> str:
    """What a late event missed: `window <id> v<n> [start, end)` or `rule <id> v<n>`."""
    window = event.source == common_definitions.DEFINITION_KIND_WINDOW
    missed = f"{'window' if window else 'rule'} {_text(event.definition_id, 30)}"
    missed += f" v{event.definition_version}"
    if window:
        start, end = event.window_start_unix_nanos, event.window_end_unix_nanos
        missed += f" [{_nanos_time(start)[11:]}, {_nanos_time(end)[11:]})"
    return missed


def _payload_text(payload: bytes) -> str:
    """A payload as text when it is UTF-8 (JSON, usually), else its size."""
    try:
        return _text(payload.decode(), 60)
    except UnicodeDecodeError:
        return f"{len(payload)} bytes"


def _number(record: Message, field: str) -> str:
    return f"{getattr(record, field):.6g}" if record.HasField(field) else "-"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _enum_text(name: str) -> str:
    """COMPATIBILITY_MODE_BACKWARD -> BACKWARD: the value without its enum's prefix."""
    for prefix in _ENUM_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


_ENUM_PREFIXES = ("COMPATIBILITY_MODE_", "UNKNOWN_TYPE_POLICY_", "COMPATIBILITY_DIRECTION_")


def _text(value: object, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


TABLES: dict[str, tuple[Column, ...]] = {
    "streammesh.gateway.v1.User": (
        Column("username", lambda u: u.username),
        Column("roles", lambda u: ",".join(u.roles) or "-"),
        Column("disabled", lambda u: _yes(u.disabled)),
        Column("mfa", lambda u: _yes(u.mfa_enabled)),
        Column("locked until", lambda u: _set_time(u, "locked_until")),
        Column("created", lambda u: _set_time(u, "created_at")),
        Column("tenant", lambda u: u.tenant or "-"),
        Column("id", lambda u: u.user_id),
    ),
    "streammesh.gateway.v1.Tenant": (
        Column("id", lambda t: t.tenant_id),
        Column("name", lambda t: _text(t.display_name, 40)),
        Column("disabled", lambda t: _yes(t.disabled)),
        Column("created", lambda t: _set_time(t, "created_at")),
        Column("disabled at", lambda t: _set_time(t, "disabled_at")),
    ),
    "streammesh.gateway.v1.SigningKey": (
        Column("kid", lambda k: k.kid),
        Column("alg", lambda k: k.alg),
        Column("active", lambda k: _yes(k.active)),
        Column("created", lambda k: _set_time(k, "created_at")),
        Column("retired", lambda k: _set_time(k, "retired_at")),
    ),
    "streammesh.gateway.v1.AuditEvent": (
        Column("time", lambda e: _set_time(e, "time")),
        Column("actor", lambda e: e.actor or "-"),
        Column("action", lambda e: e.action),
        Column("subject", lambda e: e.subject or "-"),
        Column("outcome", lambda e: e.outcome),
        Column("reason", lambda e: e.reason or "-"),
        Column("source", lambda e: e.source or "-"),
        Column("tenant", lambda e: e.tenant or "-"),
    ),
    "streammesh.gateway.v1.DeadLetter": (
        Column("id", lambda d: str(d.id)),
        Column("partition", lambda d: str(d.partition)),
        Column("entry", lambda d: d.entry_id),
        Column("events", lambda d: str(len(d.event_ids))),
        Column("deliveries", lambda d: str(d.delivery_count)),
        Column("created", lambda d: _set_time(d, "created_at")),
        Column("replayed", lambda d: _set_time(d, "replayed_at")),
        Column("error", lambda d: _text(d.error)),
    ),
    "streammesh.common.v1.SchemaSubject": (
        Column("type", lambda s: s.event_type),
        Column(
            "mode", lambda s: _enum_text(common_schemas.CompatibilityMode.Name(s.compatibility))
        ),
        Column("latest", lambda s: str(s.latest_version or "-")),
        Column("updated", lambda s: _set_time(s, "updated_at")),
    ),
    "streammesh.common.v1.SchemaVersion": (
        Column("version", lambda v: str(v.version)),
        Column("fingerprint", lambda v: v.fingerprint),
        Column("created", lambda v: _set_time(v, "created_at")),
    ),
    "streammesh.common.v1.CompatibilityViolation": (
        Column("version", lambda v: str(v.version)),
        Column(
            "direction",
            lambda v: _enum_text(common_schemas.CompatibilityDirection.Name(v.direction)),
        ),
        Column("rule", lambda v: v.rule),
        Column("instance", lambda v: v.instance_path or "/"),
        Column("new schema", lambda v: v.new_schema_path or "/"),
        Column("message", lambda v: _text(v.message, 100)),
    ),
    "streammesh.common.v1.Definition": (
        Column("id", lambda d: d.id),
        Column("version", lambda d: str(d.version)),
        Column("enabled", lambda d: _yes(d.enabled)),
        Column("kind", lambda d: str(json.loads(d.definition_json or "{}").get("kind", "-"))),
        Column("by", lambda d: d.created_by or "-"),
        Column("created", lambda d: _set_time(d, "create_time")),
    ),
    "streammesh.common.v1.Alert": (
        Column("last event", lambda a: _nanos_time(a.last_event_time_unix_nanos)),
        Column("rule", lambda a: f"{a.rule_id} v{a.rule_version}"),
        Column("kind", lambda a: a.rule_kind),
        Column("key", lambda a: _text(a.key, 30)),
        Column("events", lambda a: str(len(a.event_ids))),
        Column("detail", lambda a: _text(a.detail_json, 60)),
        Column("id", lambda a: a.alert_id),
    ),
    "streammesh.common.v1.WindowResult": (
        Column("window", lambda r: _text(r.window_id, 30)),
        Column("start", lambda r: _nanos_time(r.start_unix_nanos)),
        Column("end", lambda r: _nanos_time(r.end_unix_nanos)),
        Column("group", lambda r: _text(r.group, 30)),
        Column("partition", lambda r: str(r.partition)),
        Column("version", lambda r: str(r.window_version)),
        Column("revision", lambda r: str(r.revision) + (" retracted" if r.retracted else "")),
        Column("values", lambda r: _text(r.values_json, 60)),
    ),
    "streammesh.common.v1.LateEvent": (
        Column("event time", lambda e: _nanos_time(e.event_time_unix_nanos)),
        Column("missed", lambda e: _missed(e)),
        Column("key", lambda e: _text(e.event_key, 30)),
        Column("watermark", lambda e: _nanos_time(e.watermark_unix_nanos)),
        Column("reason", lambda e: _text(e.reason, 60)),
        Column("event", lambda e: e.event_id),
    ),
    "streammesh.common.v1.EventRefusal": (
        Column("index", lambda r: str(r.index)),
        Column("id", lambda r: r.event_id),
        Column("reason", lambda r: r.reason),
        Column("message", lambda r: _text(r.message, 100)),
    ),
    "streammesh.common.v1.StoredEvent": (
        Column("seq", lambda s: str(s.sequence)),
        Column("event time", lambda s: _set_time(s.event, "event_time")),
        Column("key", lambda s: _text(s.event.key, 30)),
        Column("type", lambda s: _text(s.event.type, 30)),
        Column("payload", lambda s: _payload_text(s.event.payload)),
        Column("producer", lambda s: s.producer or "-"),
        Column("id", lambda s: s.event.id),
    ),
    "streammesh.common.v1.AggregateGroup": (
        Column("group", lambda g: _text(g.group, 40) or "(all)"),
        Column("count", lambda g: str(g.count)),
        Column("values", lambda g: str(g.value_count)),
        Column("sum", lambda g: _number(g, "sum")),
        Column("min", lambda g: _number(g, "min")),
        Column("max", lambda g: _number(g, "max")),
        Column("avg", lambda g: _number(g, "avg")),
    ),
    "streammesh.common.v1.QueuedEvent": (
        Column("id", lambda q: q.event.id),
        Column("key", lambda q: q.event.key),
        Column("type", lambda q: q.event.type),
        Column("payload bytes", lambda q: str(len(q.event.payload))),
        Column("producer", lambda q: q.producer or "-"),
        Column("ingested", lambda q: _set_time(q, "ingest_time")),
    ),
}


def reply_to_dict(message: Message) -> dict[str, Any]:
    """Every field of `message` as JSON-ready values, proto field names in proto order, nulls
    for unset optional fields (json_format drops those even with the no-presence option)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _add_nulls(message, data)
    return data


def _add_nulls(message: Message, data: dict[str, Any]) -> None:
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if _is_map(field):
            continue
        if _is_repeated(field):
            if field.type == FieldDescriptor.TYPE_MESSAGE and not _is_well_known(field):
                for item, item_data in zip(value, data.get(field.name, []), strict=True):
                    _add_nulls(item, item_data)
        elif field.has_presence and not message.HasField(field.name):
            data[field.name] = None
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_well_known(field):
            _add_nulls(value, data[field.name])
    # json_format writes set fields first and defaults after; keep the proto's order instead,
    # so every record of a type reads the same.
    ordered = {f.name: data[f.name] for f in message.DESCRIPTOR.fields if f.name in data}
    data.clear()
    data.update(ordered)


def _is_repeated(field: Field) -> bool:
    return bool(field.is_repeated)


def _is_map(field: Field) -> bool:
    message_type = field.message_type
    return message_type is not None and message_type.GetOptions().map_entry


def _is_well_known(field: Field) -> bool:
    return field.message_type is not None and field.message_type.full_name.startswith(
        "google.protobuf."
    )


def print_reply(message: Message, *, as_json: bool) -> None:
    """Print a reply on stdout: the full JSON for scripts, tables and lines for people."""
    if as_json:
        print(json.dumps(reply_to_dict(message), indent=2, ensure_ascii=False))
        return
    for line in _human_lines(message):
        print(line)


def _human_lines(message: Message, indent: str = "") -> list[str]:
    lines: list[str] = []
    # A reply that is just a list (and its page token) prints as a bare table; a table among
    # other fields gets its name above it.
    fields = [f for f in message.DESCRIPTOR.fields if f.name != "next_page_token"]
    bare_table = len(fields) == 1
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        name = field.name.replace("_", " ")
        if field.name == "next_page_token":
            if value:
                print(f"more: repeat with --page-token {value}", file=sys.stderr)
            continue
        columns = _columns(field.message_type)
        if _is_repeated(field) and columns is not None and not _is_map(field):
            if bare_table or not value:
                lines += _table(value, columns, name, indent)
            else:
                lines += [f"{indent}{name}:", *_table(value, columns, name, indent + "  ")]
        elif _is_map(field):
            lines.append(f"{indent}{name}:")
            lines += [f"{indent}  {key}: {value[key]}" for key in sorted(value)]
        elif _is_repeated(field):
            lines.append(f"{indent}{name}: {_repeated_text(field, value)}")
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_well_known(field):
            if message.HasField(field.name):
                lines.append(f"{indent}{name}:")
                lines += _human_lines(value, indent + "  ")
            else:
                lines.append(f"{indent}{name}: -")
        else:
            lines.append(f"{indent}{name}: {_scalar_text(message, field)}")
    return lines


def _columns(descriptor: Any) -> tuple[Column, ...] | None:
    return None if descriptor is None else TABLES.get(descriptor.full_name)


def _table(records: Any, columns: tuple[Column, ...], name: str, indent: str) -> list[str]:
    if not records:
        return [f"{indent}{name}: none"]
    rows = [[column.cell(record) for column in columns] for record in records]
    table = tabulate(rows, headers=[column.header for column in columns], tablefmt="simple")
    return [f"{indent}{line}" for line in table.splitlines()]


def _repeated_text(field: Field, values: Any) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return f"{len(values)} item(s) (see --json)"
    if not values:
        return "-"
    return ", ".join(_text(v) for v in values)


def _scalar_text(message: Message, field: Field) -> str:
    value = getattr(message, field.name)
    if field.message_type is not None and field.message_type.full_name == (
        "google.protobuf.Timestamp"
    ):
        return _time(value, message.HasField(field.name))
    if field.has_presence and not message.HasField(field.name):
        return "-"
    if isinstance(value, bool):
        return _yes(value)
    if field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return _enum_text(known.name) if known is not None else str(value)
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    if value == "":
        return "-"
    return _text(value, 200)
