"""Object and array keywords of a writer schema against a reader's.

Objects follow the writer assumption of `services.storage.schemas.compatibility`: in an object
schema with an open content model (`additionalProperties` absent, true or {}), the writer writes
only the names it declares (`properties`, `patternProperties`, and the `required` names, which
it must write). A writer schema that says
nothing about objects (no `type`, no `properties`) declares nothing and so may write anything.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jsonschema_rs

from services.storage.schemas.violations import ANY_TOKEN, Violation, pointer_join

if TYPE_CHECKING:
    from services.storage.schemas.subschema import SubschemaCheck

__all__ = ["check_arrays", "check_objects", "is_open", "pattern_matches"]


@functools.lru_cache(maxsize=1024)
def _pattern(pattern: str) -> jsonschema_rs.Validator | None:
    try:
        return jsonschema_rs.Draft202012Validator({"type": "string", "pattern": pattern})
    except ValueError:
        return None


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a property name matches a patternProperties regex, as ingest reads it (ECMA 262,
    by jsonschema-rs, whose engine does not backtrack exponentially as Python's `re` does on
    `^(a+)+$`); one that does not compile counts as matching, which keeps the check
    conservative."""
    validator = _pattern(pattern)
    if validator is None:
        return True
    try:
        return validator.is_valid(name)
    except ValueError:
        return True


def is_open(additional: Any) -> bool:
    """`additionalProperties` that admits every undeclared property (absent, true or {})."""
    return additional is None or additional is True or additional == {}


def _declares_objects(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    names = [kind] if isinstance(kind, str) else (kind or [])
    return "object" in names or "properties" in schema or "patternProperties" in schema


def _undeclared_writes(writer: Mapping[str, Any]) -> Any:
    """What the writer may write under names it does not declare: a schema, or None for none."""
    additional = writer.get("additionalProperties")
    if additional is False:
        return None
    if is_open(additional):
        # The writer assumption: a declared object model is what its writers write.
        return None if _declares_objects(writer) else True
    return additional


def _written_properties(writer: Mapping[str, Any]) -> dict[str, Any]:
    """The names the writer writes by name, each with the schema of its value: `properties`,
    and every `required` name they leave out (a writer must write it, so the writer assumption
    cannot take it away), valued as an undeclared name is (anything in an open model). A
    required name a writer pattern matches is left to the pattern; one additionalProperties
    false forbids cannot be written (the writer's objects are then none), so it is left out."""
    properties = dict(writer.get("properties", {}))
    patterns = list(writer.get("patternProperties", {}))
    additional = writer.get("additionalProperties")
    value = True if is_open(additional) else additional
    for name in writer.get("required", ()):
        if name in properties or additional is False:
            continue
        if not any(pattern_matches(pattern, name) for pattern in patterns):
            properties[name] = value
    return properties


def _reader_schemas_for(reader: Mapping[str, Any], rp: str, name: str) -> list[tuple[Any, str]]:
    """Every reader subschema a property `name` must satisfy (properties and matching patterns),
    or the additionalProperties one when neither applies."""
    schemas: list[tuple[Any, str]] = []
    properties = reader.get("properties", {})
    if name in properties:
        schemas.append((properties[name], pointer_join(f"{rp}/properties", name)))
    for pattern, subschema in reader.get("patternProperties", {}).items():
        if pattern_matches(pattern, name):
            schemas.append((subschema, pointer_join(f"{rp}/patternProperties", pattern)))
    if not schemas:
        additional = reader.get("additionalProperties", True)
        schemas.append((additional, f"{rp}/additionalProperties"))
    return schemas


def check_objects(
    checker: SubschemaCheck,
    writer: Mapping[str, Any],
    wp: str,
    reader: Mapping[str, Any],
    rp: str,
    ip: str,
) -> list[Violation]:
    found: list[Violation] = []
    writer_required = set(writer.get("required", ()))
    for name in reader.get("required", ()):
        if name not in writer_required:
            found.append(
                checker.violation(
                    "required-added",
                    f"the reader requires property {name!r}, the writer may leave it out "
                    "(a default does not count: validators do not fill defaults in)",
                    pointer_join(ip, name),
                    wp,
                    f"{rp}/required",
                )
            )
    declared = writer.get("properties", {})
    for name, subschema in _written_properties(writer).items():
        if subschema is False:
            continue
        name_pointer = (
            pointer_join(f"{wp}/properties", name) if name in declared else f"{wp}/required"
        )
        for reader_schema, reader_pointer in _reader_schemas_for(reader, rp, name):
            if reader_schema is False:
                found.append(
                    checker.violation(
                        "additional-properties-closed",
                        f"the writer may write property {name!r}, which the reader does not "
                        "declare while its additionalProperties is false",
                        pointer_join(ip, name),
                        name_pointer,
                        reader_pointer,
                    )
                )
                continue
            found.extend(
                checker.check(
                    subschema,
                    name_pointer,
                    reader_schema,
                    reader_pointer,
                    pointer_join(ip, name),
                )
            )
    found.extend(_check_writer_patterns(checker, writer, wp, reader, rp, ip))
    undeclared = _undeclared_writes(writer)
    if undeclared is not None:
        found.extend(_check_undeclared(checker, undeclared, writer, wp, reader, rp, ip))
    found.extend(_check_property_counts(checker, writer, wp, reader, rp, ip, undeclared))
    return found


def _check_writer_patterns(
    checker: SubschemaCheck,
    writer: Mapping[str, Any],
    wp: str,
    reader: Mapping[str, Any],
    rp: str,
    ip: str,
) -> list[Violation]:
    found: list[Violation] = []
    reader_patterns = reader.get("patternProperties", {})
    for pattern, subschema in writer.get("patternProperties", {}).items():
        if subschema is False:
            continue
        wpp = pointer_join(f"{wp}/patternProperties", pattern)
        at = pointer_join(ip, ANY_TOKEN)
        for name, reader_schema in reader.get("properties", {}).items():
            if pattern_matches(pattern, name):
                rpp = pointer_join(f"{rp}/properties", name)
                found.extend(checker.check(subschema, wpp, reader_schema, rpp, at))
        if pattern in reader_patterns:
            rpp = pointer_join(f"{rp}/patternProperties", pattern)
            found.extend(checker.check(subschema, wpp, reader_patterns[pattern], rpp, at))
        elif reader_patterns:
            found.append(
                checker.violation(
                    "unsupported-construct",
                    f"cannot prove compatible: the writer's pattern {pattern!r} is not among the "
                    "reader's patternProperties (regex overlap is not decided)",
                    at,
                    wpp,
                    f"{rp}/patternProperties",
                )
            )
        else:
            additional = reader.get("additionalProperties", True)
            found.extend(
                checker.check(subschema, wpp, additional, f"{rp}/additionalProperties", at)
            )
    return found


def _check_undeclared(
    checker: SubschemaCheck,
    undeclared: Any,
    writer: Mapping[str, Any],
    wp: str,
    reader: Mapping[str, Any],
    rp: str,
    ip: str,
) -> list[Violation]:
    """The writer may write other names, with values of `undeclared`: each reader schema such a
    name can meet must accept them."""
    found: list[Violation] = []
    wap = f"{wp}/additionalProperties"
    at = pointer_join(ip, ANY_TOKEN)
    writer_properties = _written_properties(writer)
    writer_patterns = list(writer.get("patternProperties", {}))
    for name, reader_schema in reader.get("properties", {}).items():
        if name in writer_properties or any(pattern_matches(p, name) for p in writer_patterns):
            continue
        rpp = pointer_join(f"{rp}/properties", name)
        found.extend(checker.check(undeclared, wap, reader_schema, rpp, pointer_join(ip, name)))
    for pattern, reader_schema in reader.get("patternProperties", {}).items():
        rpp = pointer_join(f"{rp}/patternProperties", pattern)
        found.extend(checker.check(undeclared, wap, reader_schema, rpp, at))
    additional = reader.get("additionalProperties", True)
    if additional is False:
        found.append(
            checker.violation(
                "additional-properties-closed",
                "the writer may write properties the reader does not declare, and the reader's "
                "additionalProperties is false",
                at,
                wap,
                f"{rp}/additionalProperties",
            )
        )
    else:
        found.extend(checker.check(undeclared, wap, additional, f"{rp}/additionalProperties", at))
    return found


def _check_property_counts(
    checker: SubschemaCheck,
    writer: Mapping[str, Any],
    wp: str,
    reader: Mapping[str, Any],
    rp: str,
    ip: str,
    undeclared: Any,
) -> list[Violation]:
    found: list[Violation] = []
    writer_min = max(writer.get("minProperties", 0), len(set(writer.get("required", ()))))
    if reader.get("minProperties", 0) > writer_min:
        found.append(
            checker.violation(
                "min-properties-raised",
                f"the reader requires at least {reader['minProperties']} properties, the "
                f"writer may write {writer_min}",
                ip,
                wp,
                f"{rp}/minProperties",
            )
        )
    if "maxProperties" in reader:
        declared = [n for n, s in _written_properties(writer).items() if s is not False]
        bounded = undeclared is None and not writer.get("patternProperties")
        writer_max = min(
            writer.get("maxProperties", float("inf")),
            len(declared) if bounded else float("inf"),
        )
        if reader["maxProperties"] < writer_max:
            found.append(
                checker.violation(
                    "max-properties-lowered",
                    f"the reader allows at most {reader['maxProperties']} properties, the "
                    f"writer may write {writer_max}",
                    ip,
                    wp,
                    f"{rp}/maxProperties",
                )
            )
    return found


def check_arrays(
    checker: SubschemaCheck,
    writer: Mapping[str, Any],
    wp: str,
    reader: Mapping[str, Any],
    rp: str,
    ip: str,
) -> list[Violation]:
    """Items position by position (prefixItems, then items), then the length bounds."""
    found: list[Violation] = []
    writer_prefix = writer.get("prefixItems", [])
    reader_prefix = reader.get("prefixItems", [])
    writer_items = writer.get("items", True)
    reader_items = reader.get("items", True)
    writer_max = min(
        writer.get("maxItems", float("inf")),
        len(writer_prefix) if writer_items is False else float("inf"),
    )
    for index in range(max(len(writer_prefix), len(reader_prefix))):
        if index >= writer_max:
            break
        if index < len(writer_prefix):
            item, item_pointer = writer_prefix[index], f"{wp}/prefixItems/{index}"
        else:
            item, item_pointer = writer_items, f"{wp}/items"
        if index < len(reader_prefix):
            target, target_pointer = reader_prefix[index], f"{rp}/prefixItems/{index}"
        else:
            target, target_pointer = reader_items, f"{rp}/items"
        if target is False and item is not False:
            found.append(
                checker.violation(
                    "tuple-closed",
                    f"the writer may write an item at position {index}, the reader's array "
                    "allows none there (items: false)",
                    pointer_join(ip, index),
                    item_pointer,
                    target_pointer,
                )
            )
            break
        found.extend(
            checker.check(item, item_pointer, target, target_pointer, pointer_join(ip, index))
        )
    if writer_max > max(len(writer_prefix), len(reader_prefix)):
        found.extend(
            checker.check(
                writer_items,
                f"{wp}/items",
                reader_items,
                f"{rp}/items",
                pointer_join(ip, ANY_TOKEN),
            )
        )
    writer_min = writer.get("minItems", 0)
    if reader.get("minItems", 0) > writer_min:
        found.append(
            checker.violation(
                "min-items-raised",
                f"the reader requires at least {reader['minItems']} items, the writer allows "
                f"{writer_min}",
                ip,
                wp,
                f"{rp}/minItems",
            )
        )
    if "maxItems" in reader and reader["maxItems"] < writer_max:
        found.append(
            checker.violation(
                "max-items-lowered",
                f"the reader allows at most {reader['maxItems']} items, the writer "
                + (f"{writer_max}" if writer_max != float("inf") else "any number"),
                ip,
                wp,
                f"{rp}/maxItems",
            )
        )
    unique = reader.get("uniqueItems") is True and writer.get("uniqueItems") is not True
    if unique and writer_max > 1:
        found.append(
            checker.violation(
                "unique-items-added",
                "the reader requires unique items, the writer may repeat one",
                ip,
                wp,
                f"{rp}/uniqueItems",
            )
        )
    return found
