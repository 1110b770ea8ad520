"""What a filter may name in an event's payload: the fields a JSON Schema declares, and the scope
of one query (the schemas of the event types it reads).

The rule when a query spans several types, or types without a schema (see `FieldScope`):
- a payload field is known when at least one schema in scope declares it, and every schema in
  scope that declares it gives it the same JSON type (integer and number count as number where
  they meet); a conflict is refused, naming the types. Events of a type that does not declare
  the field simply do not match a restriction on it (and do match its NOT);
- a field no schema in scope declares is refused, unless the scope allows undeclared fields
  (`allow_undeclared`, for types without a schema): then the literal types it (a number
  compares as a number, true/false as a boolean, anything else as a string).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

__all__ = [
    "ITEMS_SUFFIX",
    "MAX_PAYLOAD_FIELDS",
    "FieldScope",
    "JsonType",
    "PayloadFields",
    "payload_fields",
]

JsonType = Literal["string", "number", "integer", "boolean", "object", "array"]
PayloadFields = Mapping[str, JsonType]
"""Dotted path (`customer.tier`) -> the JSON type its schema declares."""
ITEMS_SUFFIX = "[]"
"""`tags[]` holds the type of the items of the array `tags`, when the schema declares it."""

_JSON_TYPES: frozenset[str] = frozenset(get_args(JsonType))
_MAX_REF_HOPS = 32
_MAX_PATH_CHARS = 1000
MAX_PAYLOAD_FIELDS = 2000
"""Fields declared per schema, at most, shallowest first: a recursive schema that names itself
twice per level has 2**n paths of n levels, and a walk of them all would never end."""


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    # Local references only (`#/$defs/Address`); a remote or broken one declares nothing.
    for _ in range(_MAX_REF_HOPS):
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#"):
            return schema
        target: Any = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        if not isinstance(target, Mapping):
            return {}
        schema = target
    return {}


def _declared_type(schema: Mapping[str, Any]) -> JsonType | None:
    declared = schema.get("type")
    names = [declared] if isinstance(declared, str) else declared
    if not isinstance(names, list):
        names = [_literal_type(value) for value in _literals(schema)]
    kinds = {name for name in names if name in _JSON_TYPES}  # "null" is no comparable type
    if kinds == {"integer", "number"}:
        return "number"
    return cast(JsonType, kinds.pop()) if len(kinds) == 1 else None


def _literals(schema: Mapping[str, Any]) -> list[Any]:
    if "const" in schema:
        return [schema["const"]]
    values = schema.get("enum")
    return list(values) if isinstance(values, list) else []


def _literal_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "array" if isinstance(value, list) else "null"


def _properties(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    # The schema's own properties and those of its allOf parts (the usual composition); anyOf
    # and oneOf alternatives declare nothing for certain, so they are left out.
    parts = [schema, *(_resolve(p, root) for p in schema.get("allOf", ()) if isinstance(p, dict))]
    for part in parts:
        properties = part.get("properties")
        if isinstance(properties, Mapping):
            yield from properties.items()


def _walk(root: Mapping[str, Any]) -> dict[str, JsonType]:
    # Breadth first, so that the budget keeps the shallow fields of a recursive schema.
    out: dict[str, JsonType] = {}
    queue: deque[tuple[Mapping[str, Any], str]] = deque([(_resolve(root, root), "")])
    while queue:
        schema, prefix = queue.popleft()
        if len(prefix) > _MAX_PATH_CHARS:  # a recursive $ref: the path would never end
            continue
        for name, child in _properties(schema, root):
            if len(out) >= MAX_PAYLOAD_FIELDS:
                return out
            if not isinstance(child, Mapping):
                continue
            child = _resolve(child, root)
            path = f"{prefix}{name}"
            kind = _declared_type(child) or ("object" if "properties" in child else None)
            if kind is None:
                continue
            out.setdefault(path, kind)
            if kind == "object":
                queue.append((child, f"{path}."))
            elif kind == "array" and isinstance(child.get("items"), Mapping):
                item_kind = _declared_type(_resolve(child["items"], root))
                if item_kind is not None and item_kind not in ("object", "array"):
                    out.setdefault(path + ITEMS_SUFFIX, item_kind)
    return out


def payload_fields(schema: Mapping[str, Any]) -> dict[str, JsonType]:
    """The payload fields a JSON Schema declares, nested objects included (`customer.tier`), with
    their JSON type. Properties come from `properties` and `allOf` parts, through local `$ref`s;
    a type list with null (["string", "null"]) is the other type, [integer, number] is number,
    and `const`/`enum` give their values' type. A property whose type is not one JSON type
    (anyOf, a mixed list, no type at all) is not declared for filtering. At most
    MAX_PAYLOAD_FIELDS, the shallowest first."""
    return _walk(schema)


@dataclass(frozen=True)
class FieldScope:
    """The payload fields a query may filter on: one `PayloadFields` per event type in scope
    that has a schema (the query's types, or every type of the tenant when it names none)."""

    schemas: Mapping[str, PayloadFields] = field(default_factory=dict)
    allow_undeclared: bool = False
    """True when the scope also reads types without a schema: a field no schema declares is
    then typed by its literal instead of refused."""

    def __post_init__(self) -> None:
        frozen = {name: MappingProxyType(dict(fields)) for name, fields in self.schemas.items()}
        object.__setattr__(self, "schemas", MappingProxyType(frozen))

    def declarations(self, path: str) -> dict[str, JsonType]:
        """The type each schema in scope gives `path` (types that do not declare it left out)."""
        return {name: fields[path] for name, fields in self.schemas.items() if path in fields}

    def declared_paths(self) -> list[str]:
        """Every path some schema in scope declares, sorted (item types left out)."""
        paths = {path for fields in self.schemas.values() for path in fields}
        return sorted(path for path in paths if not path.endswith(ITEMS_SUFFIX))
