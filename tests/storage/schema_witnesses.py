"""An independent semantic oracle for schema compatibility, built only from a real validator
(`jsonschema`) and the writer assumption of services.storage.schemas.compatibility; it shares
no code with the checker.

- `writer_schema(s)` is the set of instances writers using `s` write: `s` with every open
  object model that declares properties closed (additionalProperties false), as documented,
  its required names kept writable (with any value) where `properties` leaves them out.
- `generate(s)` walks a writer schema and proposes instances (boundary numbers, lengths, enum
  values, optional properties in and out); only those the writer schema accepts are kept, so a
  mistake here can only lower coverage, never make a wrong verdict pass.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping
from typing import Any

from jsonschema import Draft202012Validator

__all__ = ["generate", "property_names", "reader_validator", "writer_validator"]

_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_SINGLE = ("additionalProperties", "items", "not")
_NAMES = ("zz_extra", "x_a", "x_b", "other")
_STRINGS = ("", "a", "ab", "abc", "A", "zzz", "abcdefg", "abcdefghijklmnop", "x_1")


def _declares_objects(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else (kind or [])
    return "object" in kinds or "properties" in schema or "patternProperties" in schema


def _close(schema: Any) -> Any:
    if not isinstance(schema, Mapping):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if key in closed:
            closed[key] = {name: _close(value) for name, value in closed[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if key in closed:
            closed[key] = [_close(value) for value in closed[key]]
    for key in _SUBSCHEMA_SINGLE:
        if key in closed:
            closed[key] = _close(closed[key])
    additional = closed.get("additionalProperties")
    if _declares_objects(closed) and additional in (None, True, {}):
        closed["additionalProperties"] = False
        # A required name is written even when `properties` leaves it out: the schema demands it.
        patterns = list(closed.get("patternProperties", {}))
        undeclared = {
            name: True
            for name in closed.get("required", ())
            if name not in closed.get("properties", {})
            and not any(re.search(pattern, name) for pattern in patterns)
        }
        if undeclared:
            closed["properties"] = {**closed.get("properties", {}), **undeclared}
    return closed


def writer_validator(schema: Any) -> Draft202012Validator:
    """Accepts exactly what writers using `schema` write (the documented assumption)."""
    return Draft202012Validator(_close(schema), format_checker=Draft202012Validator.FORMAT_CHECKER)


def reader_validator(schema: Any) -> Draft202012Validator:
    """Plain Draft 2020-12 validity, formats asserted (as ingest does)."""
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


class _Generator:
    def __init__(self, root: Any, rng: random.Random, names: tuple[str, ...]) -> None:
        self.root = root
        self.rng = rng
        self.names = (*_NAMES, *names)
        self.numbers = sorted(set(_numbers(root)), key=repr)

    def value(self, schema: Any, depth: int) -> Any:
        if schema is True or schema == {} or depth > 5:
            return self.anything(depth)
        if schema is False:
            return None
        if "$ref" in schema:
            return self.value(_resolve(self.root, schema["$ref"]), depth + 1)
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                return self.value(self.rng.choice(schema[key]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        kind = schema.get("type")
        kinds = [kind] if isinstance(kind, str) else list(kind or [])
        if not kinds:
            kinds = ["null", "boolean", "integer", "number", "string", "array", "object"]
        chosen = self.rng.choice(kinds)
        if chosen == "object":
            return self.object(schema, depth)
        if chosen == "array":
            return self.array(schema, depth)
        return self.scalar(chosen)

    def scalar(self, kind: str) -> Any:
        if kind == "null":
            return None
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "string":
            return self.rng.choice(_STRINGS)
        pool = [*self.numbers, 0, 1, -1, 2, 3, 7, 1.5, -0.5]
        if kind == "integer":
            pool = [int(n) for n in pool if float(n).is_integer()]
        return self.rng.choice(pool)

    def object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        required = set(schema.get("required", ()))
        result: dict[str, Any] = {}
        for name, subschema in schema.get("properties", {}).items():
            if name in required or self.rng.random() < 0.6:
                result[name] = self.value(subschema, depth + 1)
        for pattern, subschema in schema.get("patternProperties", {}).items():
            for name in self.names:
                if re.search(pattern, name) and self.rng.random() < 0.5:
                    result[name] = self.value(subschema, depth + 1)
        additional = schema.get("additionalProperties")
        if isinstance(additional, Mapping) and additional and self.rng.random() < 0.5:
            result[self.rng.choice(self.names)] = self.value(additional, depth + 1)
        for name in required - result.keys():
            result[name] = self.anything(depth + 1)
        return result

    def array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        items = [self.value(sub, depth + 1) for sub in schema.get("prefixItems", [])]
        extra = self.rng.randint(0, 4)
        if schema.get("items") is False:
            extra = 0
        items.extend(self.value(schema.get("items", True), depth + 1) for _ in range(extra))
        if self.rng.random() < 0.3:
            items = items[: self.rng.randint(0, len(items))]
        return items

    def anything(self, depth: int) -> Any:
        kind = self.rng.choice(
            ["null", "boolean", "integer", "number", "string", "array", "object"]
        )
        if kind == "array" and depth < 4:
            return [self.anything(depth + 1) for _ in range(self.rng.randint(0, 2))]
        if kind == "object" and depth < 4:
            return {self.rng.choice(self.names): self.anything(depth + 1)}
        return self.scalar("string" if kind in ("array", "object") else kind)


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for token in ref.lstrip("#").split("/")[1:]:
        node = node[token.replace("~1", "/").replace("~0", "~")]
    return node


def _numbers(node: Any) -> Iterator[float]:
    """Every numeric keyword value in the schema and its neighbours, as boundary candidates."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
                yield from (value, value - 1, value + 1, value - 0.5, value + 0.5, value * 5)
            else:
                yield from _numbers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _numbers(item)


def property_names(*schemas: Any) -> tuple[str, ...]:
    """Every name under `properties` anywhere in the schemas (undeclared names worth trying)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            found.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for schema in schemas:
        walk(schema)
    return tuple(sorted(found))


def generate(
    schema: Any, *, count: int = 400, seed: int = 0, names: tuple[str, ...] = ()
) -> list[Any]:
    """Distinct instances that writers using `schema` may write (filtered by the writer
    validator), found by a seeded walk of the schema; `names` are extra property names to try
    where the schema lets writers write undeclared ones."""
    rng = random.Random(seed)
    generator = _Generator(schema, rng, names)
    validator = writer_validator(schema)
    kept: dict[str, Any] = {}
    for _ in range(count):
        candidate = generator.value(schema, 0)
        if validator.is_valid(candidate):
            kept.setdefault(json.dumps(candidate, sort_keys=True), candidate)
    return list(kept.values())
