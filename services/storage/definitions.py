"""The request rules of rule and window definitions, between the handlers and the store: reading
a submitted document, the fields storage sets (tenant, id, version, a rule's enabled and
activation), the engine's own check of the result (streammesh.definitions, the parser the
processors run), and the protobuf forms of rows.

Storage owns tenant and version: a document may leave them out; a tenant it names must be the
caller's (a document meant for another tenant is refused, not moved), a version it names is
replaced by the one written (so a document read back, edited and resubmitted just works). A rule's activation never goes backwards from one version to the next (the
engine refuses a newer version that activates earlier): left out, it is the previous version's.
"""

from __future__ import annotations

import json
from typing import Any

from services.storage.definition_store import DefinitionRow, NewVersion
from streammesh.api.common.v1 import definitions_pb2 as common
from streammesh.definitions import KIND_RULE, KIND_WINDOW, DefinitionProblem, check_definition
from streammesh.definitions.rules import Rule
from streammesh.mesh.errors import InvalidArgument

__all__ = [
    "MAX_DEFINITION_BYTES",
    "checked_id",
    "definition_message",
    "kind_name",
    "kind_value",
    "next_version",
    "parse_definition_json",
]

MAX_DEFINITION_BYTES = 64 * 1024
"""A definition document is at most this long (UTF-8)."""
_MAX_ID_CHARS = 128
_KINDS: dict[int, str] = {
    common.DEFINITION_KIND_RULE: KIND_RULE,
    common.DEFINITION_KIND_WINDOW: KIND_WINDOW,
}
_ROOT = "definition"


def _refuse(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {problem}", field_violations=[(field, problem)])


def kind_name(value: int) -> str:
    """'rule' or 'window' for the request's kind (the gateway always fills it)."""
    name = _KINDS.get(value)
    if name is None:
        raise _refuse("kind", "must be RULE or WINDOW")
    return name


def kind_value(name: str) -> common.DefinitionKind.ValueType:
    return common.DefinitionKind.Value(f"DEFINITION_KIND_{name.upper()}")


def checked_id(definition_id: str, field: str = "id") -> str:
    if not definition_id:
        raise _refuse(field, "required")
    if len(definition_id) > _MAX_ID_CHARS or "\x00" in definition_id:
        raise _refuse(field, f"at most {_MAX_ID_CHARS} characters, no NUL")
    return definition_id


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_definition_json(definition_json: str) -> dict[str, Any]:
    """The submitted document: a JSON object of bounded size, else InvalidArgument."""
    if not definition_json.strip():
        raise _refuse("definition_json", "a JSON object is required")
    if len(definition_json.encode()) > MAX_DEFINITION_BYTES:
        raise _refuse("definition_json", f"longer than {MAX_DEFINITION_BYTES} bytes")
    try:
        document = json.loads(definition_json, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        raise _refuse("definition_json", f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise _refuse("definition_json", "must be a JSON object")
    return document


def _own(document: dict[str, Any], name: str, value: Any, problem: str) -> None:
    """Set a field storage owns; a value the client gave must already be that one."""
    given = document.get(name, value)
    if given != value or type(given) is not type(value):
        raise _refuse(f"{_ROOT}.{name}", f"{problem} (or leave it out); got {given!r}")
    document[name] = value


def next_version(
    kind: str,
    tenant: str,
    definition_id: str,
    document: dict[str, Any],
    latest: DefinitionRow | None,
    *,
    enabled: bool | None = None,
) -> NewVersion:
    """The version to write after `latest` (None: version 1), checked by the engine's parser.
    `enabled` None keeps the latest's (True for a new id) unless a rule's document says."""
    version = 1 if latest is None else latest.version + 1
    document = dict(document)
    _own(document, "id", definition_id, f"must be {definition_id!r}")
    _own(document, "tenant", tenant, f"must be your tenant {tenant!r}")
    # The version is storage's to number: a document read back (`rule show`) and edited carries
    # the version it came from, which the new version replaces.
    document["version"] = version
    if enabled is None:
        enabled = latest.enabled if latest is not None else True
        if kind == KIND_RULE and isinstance(document.get("enabled"), bool):
            enabled = document["enabled"]
    if kind == KIND_RULE:
        document["enabled"] = enabled
        previous = latest.definition.get("activation") if latest is not None else None
        if "activation" not in document and previous is not None:
            document["activation"] = previous
    try:
        parsed = check_definition(kind, document, _ROOT)
    except DefinitionProblem as problem:
        raise _refuse(problem.path, problem.problem) from None
    activation = None
    if isinstance(parsed, Rule) and "activation" in document:
        activation = parsed.activation_nanos
        if latest is not None and latest.definition.get("activation") is not None:
            before = check_definition(kind, latest.definition, _ROOT)
            assert isinstance(before, Rule)
            if activation < before.activation_nanos:
                raise _refuse(
                    f"{_ROOT}.activation",
                    f"must not be before version {latest.version}'s activation "
                    f"({latest.definition['activation']!r})",
                )
    return NewVersion(definition=document, enabled=enabled, activation_nanos=activation)


def definition_message(row: DefinitionRow) -> common.Definition:
    message = common.Definition(
        kind=kind_value(row.kind),
        id=row.definition_id,
        version=row.version,
        definition_json=json.dumps(row.definition, separators=(",", ":"), ensure_ascii=False),
        enabled=row.enabled,
        created_by=row.created_by,
    )
    message.create_time.FromDatetime(row.created_at)
    return message
