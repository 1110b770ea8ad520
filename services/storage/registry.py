"""The schema registry's request rules, between the handlers and the store: reading a submitted
document, its fingerprint, turning schema problems and compatibility violations into field
violations, the protobuf forms of rows, and the listings' page tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from services.storage.registry_store import SubjectRow, VersionRow
from services.storage.schemas import (
    CompatibilityMode,
    CompatibilityReport,
    CompatibilityViolation,
    Direction,
    PreviousVersion,
    check_compatibility,
    schema_problems,
)
from streammesh.api.common.v1 import schema_registry_pb2 as common
from streammesh.envelope import EnvelopeLimits, text_problem
from streammesh.mesh import paging
from streammesh.mesh.errors import InvalidArgument

__all__ = [
    "MAX_CHANGES",
    "MAX_SCHEMA_BYTES",
    "MAX_VIOLATIONS_LISTED",
    "Document",
    "changes_limit",
    "checked_event_type",
    "checked_mode",
    "checked_tenant",
    "compatibility_report",
    "decode_page_token",
    "encode_page_token",
    "incompatible",
    "mode_name",
    "mode_value",
    "page_size",
    "parse_document",
    "subject_message",
    "version_message",
    "violation_message",
]

MAX_SCHEMA_BYTES = 256 * 1024
"""A schema document is at most this long (UTF-8)."""
MAX_VIOLATIONS_LISTED = 100
"""Field violations in one refusal; the message gives the total."""
_MAX_TENANT_CHARS = 128
_MAX_TOKEN_CHARS = 600
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class Document:
    """A submitted schema: parsed, in the compact form stored, and its fingerprint."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        self.text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        canonical = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
        self.fingerprint = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def parse_document(schema_json: str) -> Document:
    """The document, or InvalidArgument naming every problem (field `schema_json#<pointer>`)."""
    if not schema_json.strip():
        raise InvalidArgument(
            "schema_json is empty", field_violations=[("schema_json", "a JSON Schema is required")]
        )
    if len(schema_json.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidArgument(
            f"schema_json is larger than {MAX_SCHEMA_BYTES} bytes",
            field_violations=[("schema_json", f"larger than {MAX_SCHEMA_BYTES} bytes")],
        )
    try:
        schema = json.loads(schema_json, parse_constant=_refuse_constant)
    except ValueError as error:
        raise InvalidArgument(
            f"schema_json is not JSON: {error}", field_violations=[("schema_json", str(error))]
        ) from None
    problems = schema_problems(schema)
    if problems:
        shown = problems[:MAX_VIOLATIONS_LISTED]
        first = shown[0]
        raise InvalidArgument(
            f"schema_json is not a valid Draft 2020-12 schema the registry can keep: "
            f"{len(problems)} problem(s); first at {first.path or '/'}: {first.message}",
            field_violations=[(f"schema_json#{p.path}", p.message) for p in shown],
        )
    return Document(schema)


def checked_event_type(event_type: str) -> str:
    reason = text_problem(event_type, EnvelopeLimits().max_type_chars)
    if not event_type:
        reason = "required"
    if reason is not None:
        raise InvalidArgument(f"event_type: {reason}", field_violations=[("event_type", reason)])
    return event_type


def checked_tenant(tenant: str) -> str:
    """The tenant the caller (gateway or ingest) named; it fills it, a client never does."""
    reason = text_problem(tenant, _MAX_TENANT_CHARS)
    if not tenant:
        reason = "required (the gateway fills it from the caller's token)"
    if reason is not None:
        raise InvalidArgument(f"tenant: {reason}", field_violations=[("tenant", reason)])
    return tenant


_PREFIX = "COMPATIBILITY_MODE_"


def mode_name(value: int) -> str:
    """The store's name of a CompatibilityMode enum value."""
    return common.CompatibilityMode.Name(value).removeprefix(_PREFIX)  # type: ignore[arg-type]


def mode_value(name: str) -> common.CompatibilityMode.ValueType:
    return common.CompatibilityMode.Value(_PREFIX + name)


def checked_mode(value: int, field: str, *, required: bool) -> CompatibilityMode | None:
    if value == common.COMPATIBILITY_MODE_UNSPECIFIED:
        if required:
            raise InvalidArgument(
                f"{field} is required", field_violations=[(field, "UNSPECIFIED is not a mode")]
            )
        return None
    if value not in common.CompatibilityMode.values():
        raise InvalidArgument(
            f"{field}: unknown mode {value}", field_violations=[(field, f"unknown mode {value}")]
        )
    return CompatibilityMode(mode_name(value))


def compatibility_report(
    document: Document, mode: CompatibilityMode, versions: Sequence[VersionRow]
) -> CompatibilityReport:
    previous = [PreviousVersion(v.version, json.loads(v.schema_text)) for v in versions]
    return check_compatibility(document.schema, previous, mode)


def _violation_field(violation: CompatibilityViolation) -> tuple[str, str]:
    return (
        f"schema_json#{violation.new_schema_path}",
        f"{violation.rule}: {violation.message} (instance {violation.instance_path or '/'};"
        f" version {violation.version} at {violation.old_schema_path or '/'})",
    )


def incompatible(report: CompatibilityReport) -> InvalidArgument:
    """The refusal of an incompatible version: INVALID_ARGUMENT (the document is what the
    client must change), every violation a field violation."""
    first = report.violations[0]
    versions = ", ".join(str(v) for v in report.checked_versions)
    return InvalidArgument(
        f"the schema is not {report.mode} compatible with version(s) {versions}: "
        f"{len(report.violations)} violation(s); first: {first.rule} at "
        f"{first.instance_path or '/'}: {first.message}",
        field_violations=[_violation_field(v) for v in report.violations[:MAX_VIOLATIONS_LISTED]],
    )


_DIRECTIONS = {
    Direction.BACKWARD: common.COMPATIBILITY_DIRECTION_BACKWARD,
    Direction.FORWARD: common.COMPATIBILITY_DIRECTION_FORWARD,
}


def violation_message(violation: CompatibilityViolation) -> common.CompatibilityViolation:
    return common.CompatibilityViolation(
        version=violation.version,
        direction=_DIRECTIONS[violation.direction],
        rule=violation.rule,
        message=violation.message,
        instance_path=violation.instance_path,
        new_schema_path=violation.new_schema_path,
        old_schema_path=violation.old_schema_path,
    )


def subject_message(row: SubjectRow) -> common.SchemaSubject:
    message = common.SchemaSubject(
        event_type=row.event_type,
        compatibility=mode_value(row.compatibility),
        latest_version=row.latest_version,
    )
    message.created_at.FromDatetime(row.created_at)
    message.updated_at.FromDatetime(row.updated_at)
    return message


def version_message(row: VersionRow) -> common.SchemaVersion:
    message = common.SchemaVersion(
        event_type=row.event_type,
        version=row.version,
        schema_json=row.schema_text,
        fingerprint=row.fingerprint,
    )
    message.created_at.FromDatetime(row.created_at)
    return message


MAX_CHANGES = 1000
"""Changes one ListSchemaChanges / ListDefinitionChanges call returns at most."""
_DEFAULT_CHANGES = 500


def changes_limit(value: int) -> int:
    """A change-log call's `limit`: 1 to MAX_CHANGES, 0 for the default (500)."""
    if not 0 <= value <= MAX_CHANGES:
        raise InvalidArgument(
            f"limit must be 0..{MAX_CHANGES}",
            field_violations=[("limit", f"{value} is out of range")],
        )
    return value or _DEFAULT_CHANGES


def page_size(value: int) -> int:
    """The page size of a registry or definitions listing (AIP-158, streammesh.mesh.paging)."""
    return paging.page_size(value, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)


def _scope(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def encode_page_token(after: str | int, *scope: str) -> str:
    """An opaque token continuing after `after` in the listing named by `scope`."""
    body = json.dumps({"a": after, "s": _scope(*scope)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).rstrip(b"=").decode()


def decode_page_token(token: str, kind: type[str] | type[int], *scope: str) -> Any:
    """The position a token continues after; InvalidArgument for a token this listing did not
    issue."""
    refused = InvalidArgument(
        "invalid page_token: not issued for this listing; start again without a token",
        field_violations=[("page_token", "not issued for this listing")],
    )
    if len(token) > _MAX_TOKEN_CHARS:
        raise refused
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise refused from None
    if not isinstance(body, dict) or body.get("s") != _scope(*scope):
        raise refused
    after = body.get("a")
    if type(after) is not kind:
        raise refused
    return after
