"""Whether a new version of a subject's JSON Schema (Draft 2020-12) is compatible with the
versions before it, in the seven modes of Confluent Schema Registry, with every violation named.

Modes
-----
- BACKWARD (the default): consumers using the new schema can read data written with the old
  one: every instance a writer of the old schema produces validates under the new.
- FORWARD: the reverse: consumers still on the old schema can read data written with the new.
- FULL: both. NONE: no check.
- The plain modes compare with the latest version only; the *_TRANSITIVE ones with every
  previous version (a chain of pairwise-compatible steps is not compatible end to end: adding a
  property, removing it, adding it back with another type).

Semantics adopted: what a writer writes
---------------------------------------
Compatibility is inclusion of instance sets: BACKWARD holds when Writers(old) is a subset of
Valid(new). Valid(S) is plain JSON Schema validity. Writers(S) is the set of instances a writer
*using S* produces, and here this check differs from Confluent's (schema-registry#1458) and
Apicurio's (#5355, #2882) checkers, which take Writers(S) = Valid(S):

    In an object schema with an open content model (`additionalProperties` absent, `true` or
    `{}`) that declares an object model (`type: object`, `properties` or `patternProperties`),
    a writer writes only the property names the schema declares (listed in `properties` or
    matching `patternProperties`, and the names it lists in `required`, which a writer must
    write), each with a value valid under its subschema (any value for a required name that
    nothing else declares). The openness
    of the model is a promise to readers (tolerate what you do not know), not a licence for
    writers to emit undeclared names with arbitrary values.

Their reasoning, taken seriously: with Writers = Valid, an old open schema `{a}` admits
`{"b": 42}`, so a new version adding `b: string` would refuse data that was valid, and they
call it narrowing (PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL, OBJECT_TYPE_PROPERTY_SCHEMAS_NARROWED).
That is correct for data of unknown origin, but a registry's data comes from producers that
serialize from the registered schema: a producer on the old version has no field `b` to write.
Under that assumption, adding an optional property to an open model is compatible both ways
(readers of the old model ignore `b`, readers of the new do not require it), removing one too,
and Confluent's own rules for closed models still come out as they do there. An object schema
that declares nothing about objects (`{}` or `true`) still lets writers write anything.
Where a model's `additionalProperties` is a schema (e.g. `{"type": "string"}`), writers are
taken at their word and may write any undeclared name with such a value.
The assumption is about producers, and ingest validates payloads against the schema as written,
so a producer may still send an undeclared property to an open model and have it stored; the
verdict then holds for producers that keep to their schema. Validating at ingest against the
closed form (every open model made `additionalProperties: false`) would turn it into a guarantee;
that is a policy choice left to the ingest wiring.

Other choices, each from the JSON Schema specification:
- `default` is an annotation: a validator does not fill it in, so adding a required property
  with a default is still not BACKWARD compatible (old data lacks it and fails `required`).
- `format` is taken as an assertion (ingest checks formats), so adding or changing one on the
  reader's side may refuse data.
- `integer` is a subset of `number`: integer -> number widens, number -> integer narrows.
- Regex inclusion is not decided: a changed `pattern` (or a writer pattern the reader does not
  carry verbatim in patternProperties) is reported, not guessed.
- Constructs not analysed (if/then/else, dependentSchemas, unevaluated*, $dynamicRef,
  not/contains/propertyNames on the reader's side, a oneOf whose branches may overlap, remote
  `$ref`) are reported as `unsupported-construct`: "cannot prove compatible", never "compatible".
  On the writer's side, a keyword that only removes instances (not, contains, propertyNames,
  dependentRequired) is ignored, which is sound: the writer's set only grows.

Paths: each violation carries `instance_path`, a JSON Pointer into an event payload (`*` for any
item past prefixItems or any undeclared property name), and `new_schema_path`/`old_schema_path`,
JSON Pointers into the two schema documents.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.storage.schemas.documents import SchemaDocument
from services.storage.schemas.subschema import SubschemaCheck

__all__ = [
    "DEFAULT_MODE",
    "CompatibilityMode",
    "CompatibilityReport",
    "CompatibilityViolation",
    "Direction",
    "PreviousVersion",
    "check_compatibility",
]


class CompatibilityMode(enum.StrEnum):
    """A subject's compatibility setting (the seven of Confluent Schema Registry)."""

    NONE = "NONE"
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def directions(self) -> tuple[Direction, ...]:
        if self is CompatibilityMode.NONE:
            return ()
        if self.value.startswith("BACKWARD"):
            return (Direction.BACKWARD,)
        if self.value.startswith("FORWARD"):
            return (Direction.FORWARD,)
        return (Direction.BACKWARD, Direction.FORWARD)


DEFAULT_MODE = CompatibilityMode.BACKWARD


class Direction(enum.StrEnum):
    """Which side reads: BACKWARD = the new schema reads old data, FORWARD = the old reads new."""

    BACKWARD = "BACKWARD"
    FORWARD = "FORWARD"


@dataclass(frozen=True)
class PreviousVersion:
    """A registered version of the subject, as the registry's table will hand it over."""

    version: int
    schema: Mapping[str, Any] | bool


@dataclass(frozen=True)
class CompatibilityViolation:
    """One reason the new schema is refused against one previous version."""

    version: int
    """The previous version this violation is against."""
    direction: Direction
    rule: str
    """Stable kebab-case rule name (`required-added`, `type-refused`, `unsupported-construct`...)."""
    message: str
    instance_path: str
    """JSON Pointer into an event payload where old and new disagree (`*`: any item/name)."""
    new_schema_path: str
    """JSON Pointer into the new schema document."""
    old_schema_path: str
    """JSON Pointer into the previous version's schema document."""


@dataclass(frozen=True)
class CompatibilityReport:
    """The verdict: compatible when no violation was found (NONE never finds one)."""

    mode: CompatibilityMode
    checked_versions: tuple[int, ...]
    violations: tuple[CompatibilityViolation, ...]

    @property
    def compatible(self) -> bool:
        return not self.violations


def check_compatibility(
    new_schema: Mapping[str, Any] | bool,
    previous: Sequence[PreviousVersion],
    mode: CompatibilityMode = DEFAULT_MODE,
) -> CompatibilityReport:
    """Check `new_schema` against `previous` (registered versions, in any order) under `mode`.

    Both sides must already be valid Draft 2020-12 schemas (see `metaschema.schema_errors`);
    the first version of a subject (no previous) is always compatible.
    """
    ordered = sorted(previous, key=lambda item: item.version)
    if mode is CompatibilityMode.NONE or not ordered:
        return CompatibilityReport(mode=mode, checked_versions=(), violations=())
    against = ordered if mode.transitive else ordered[-1:]
    new_document = SchemaDocument(new_schema, name="new")
    violations: list[CompatibilityViolation] = []
    for old in reversed(against):
        old_document = SchemaDocument(old.schema, name=f"version {old.version}")
        for direction in mode.directions:
            if direction is Direction.BACKWARD:
                writer, reader = old_document, new_document
            else:
                writer, reader = new_document, old_document
            for found in SubschemaCheck(writer, reader).run():
                new_path, old_path = (
                    (found.reader_path, found.writer_path)
                    if direction is Direction.BACKWARD
                    else (found.writer_path, found.reader_path)
                )
                violations.append(
                    CompatibilityViolation(
                        version=old.version,
                        direction=direction,
                        rule=found.rule,
                        message=f"{direction} against version {old.version} (writer: "
                        f"{writer.name} schema, reader: {reader.name} schema): {found.message}",
                        instance_path=found.instance_path,
                        new_schema_path=new_path,
                        old_schema_path=old_path,
                    )
                )
    return CompatibilityReport(
        mode=mode,
        checked_versions=tuple(old.version for old in reversed(against)),
        violations=tuple(violations),
    )
