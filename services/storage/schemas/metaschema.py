"""Is a submitted document a valid Draft 2020-12 schema the registry can keep?

Checked: the Draft 2020-12 meta-schema, `$schema` naming Draft 2020-12 when present, every `$ref` resolving
inside the document (the registry stores self-contained schemas and never fetches one), and the
document compiling with jsonschema-rs, the validator ingest runs: a `pattern` is an ECMA 262
regex, and that engine (not Python's `re`, which refuses `\\p{L}`) decides whether it compiles.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from services.storage.schemas.documents import (
    MAX_NESTING,
    SchemaDocument,
    UnresolvableRef,
    too_deep,
)
from services.storage.schemas.violations import pointer_join

__all__ = ["DRAFT_2020_12", "SchemaProblem", "schema_problems"]

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
_MAX_MESSAGE = 300
# Keywords whose values are data, not subschemas: a "$ref" key inside them is not a reference.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})

_META_VALIDATOR = Draft202012Validator(Draft202012Validator.META_SCHEMA)


@dataclass(frozen=True)
class SchemaProblem:
    """Why a submitted schema is refused."""

    path: str
    """JSON Pointer into the submitted schema document ("" for the whole document)."""
    message: str


def _pointer(parts: Any) -> str:
    pointer = ""
    for part in parts:
        pointer = pointer_join(pointer, part)
    return pointer


def _deepest(error: ValidationError) -> ValidationError:
    """For a failed anyOf/oneOf of the meta-schema, the branch error that went deepest into the
    document names the bad part best (`type: "strin"` rather than the enclosing object)."""
    best = error
    for child in error.context or ():
        candidate = _deepest(child)
        if len(candidate.absolute_path) > len(best.absolute_path):
            best = candidate
    return best


def _refs(node: Any, pointer: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                yield pointer_join(pointer, key), value
            elif key not in _DATA_KEYWORDS:
                yield from _refs(value, pointer_join(pointer, key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _refs(item, pointer_join(pointer, index))


def schema_problems(schema: Any) -> list[SchemaProblem]:
    """Every problem found; an empty list means the registry may keep the document."""
    if not isinstance(schema, Mapping | bool):
        return [SchemaProblem("", "a JSON Schema is a JSON object (or true/false)")]
    deep = too_deep(schema)
    if deep is not None:
        return [SchemaProblem(deep, f"nested more than {MAX_NESTING} objects and arrays deep")]
    problems: list[SchemaProblem] = []
    if isinstance(schema, Mapping) and "$schema" in schema:
        declared = schema["$schema"]
        if not isinstance(declared, str) or declared.rstrip("#") != DRAFT_2020_12:
            problems.append(
                SchemaProblem(
                    "/$schema",
                    f"only Draft 2020-12 is supported ($schema {DRAFT_2020_12!r}), got {declared!r}",
                )
            )
    for error in sorted(_META_VALIDATOR.iter_errors(schema), key=lambda e: list(map(str, e.path))):
        deepest = _deepest(error)
        message = deepest.message
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "..."
        problems.append(SchemaProblem(_pointer(deepest.absolute_path), message))
    if problems:
        return problems
    document = SchemaDocument(schema, name="submitted")
    for pointer, ref in _refs(schema, ""):
        if pointer.endswith("/$dynamicRef"):
            problems.append(SchemaProblem(pointer, "$dynamicRef is not supported by the registry"))
            continue
        try:
            document.resolve(ref)
        except UnresolvableRef as error:
            problems.append(SchemaProblem(pointer, str(error)))
    if not problems:
        try:
            compilable = dict(schema) if isinstance(schema, Mapping) else schema
            jsonschema_rs.Draft202012Validator(compilable, validate_formats=True)
        except jsonschema_rs.ValidationError as error:
            problems.append(SchemaProblem(_pointer(error.instance_path), error.message))
        except (ValueError, jsonschema_rs.ReferencingError) as error:
            first_line = str(error).split("\n", 1)[0]
            problems.append(
                SchemaProblem("", f"ingest's validator cannot compile it: {first_line}")
            )
    return problems
