"""Does a reader schema accept every instance a writer schema lets a producer write?

The relation is inclusion of instance sets, decided structurally, keyword by keyword, under the
writer assumption that `services.storage.schemas.compatibility` documents (a writer of an object
schema writes only the properties that schema declares). The walk is sound: it says
"compatible" only when it can show inclusion, and otherwise names each reason it could not.
Finite writer languages (`enum`, `const`, `null`/`boolean`) are decided exactly by validating each
value against the reader with ingest's Draft 2020-12 validator (jsonschema-rs: formats
asserted, ECMA 262 regexes).

Why hand-written: no kept Python library decides JSON Schema inclusion (the registries that do
are Java, and they are the ones this check corrects); validation itself goes to jsonschema-rs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from services.storage.schemas.documents import (
    ANALYSED_KEYWORDS,
    ANNOTATION_KEYWORDS,
    MAX_NESTING,
    WRITER_IGNORABLE_KEYWORDS,
    SchemaDocument,
    UnresolvableRef,
    too_deep,
)
from services.storage.schemas.objects import check_arrays, check_objects
from services.storage.schemas.scalars import check_numbers, check_strings
from services.storage.schemas.violations import Violation

__all__ = ["SubschemaCheck", "json_type"]

_TYPES = frozenset({"null", "boolean", "object", "array", "string", "number", "integer"})
_COMBINATORS = frozenset({"$ref", "allOf", "anyOf", "oneOf"})
# Every Draft 2020-12 keyword that asserts something: a reader keyword outside the analysed set
# but in this one is reported; a keyword in neither is an annotation by the spec (unknown
# keywords are ignored by validators).
_ASSERTING_KEYWORDS = (
    ANALYSED_KEYWORDS
    | WRITER_IGNORABLE_KEYWORDS
    | {
        "if",
        "then",
        "else",
        "dependentSchemas",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$dynamicRef",
        "$recursiveRef",
    }
)
_MAX_DEPTH = 64
_MAX_COMPARISONS = 10_000
"""Writer/reader subschema pairs compared per check, at most: a small document can describe
exponentially many paths (each level naming the next twice) or alternatives (allOf of anyOfs),
so the work is bounded and a larger job reported as not proven, never cut short as compatible."""
_MAX_ALTERNATIVES = 256
"""Plain writer schemas one combinator may expand to, at most (the same reason)."""

Schema = Mapping[str, Any] | bool
Plain = tuple[Schema, str]


def json_type(value: Any) -> str:
    """The JSON Schema type of a decoded JSON value (1.0 counts as an integer, as the spec says)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def declared_types(schema: Mapping[str, Any]) -> frozenset[str]:
    """The `type` keyword as a set; every type when absent ("number" includes integers)."""
    value = schema.get("type")
    if value is None:
        return _TYPES
    return frozenset([value] if isinstance(value, str) else value)


def restrict_types(types: frozenset[str], only: frozenset[str] | None) -> frozenset[str]:
    """`types` narrowed to `only`, knowing that integer is a subset of number."""
    if only is None:
        return types
    kept = set(types & only)
    if "integer" in only and "number" in types:
        kept.add("integer")
    if "number" in only and "integer" in types:
        kept.add("integer")
    return frozenset(kept)


def _has_assertions(schema: Mapping[str, Any]) -> bool:
    return any(key not in ANNOTATION_KEYWORDS for key in schema)


def _merge(first: Schema, second: Schema) -> Schema | None:
    """The conjunction of two plain schemas as one object, or None where it has no simple form.

    Used on the writer's side only, for allOf, a `$ref` with siblings, and a base with anyOf
    branches. Where it unites `properties`, the writer may be assumed to write the declared
    names of either side (the usual "extend a base with allOf" intent); that only ever makes the
    writer's language larger, so the verdict stays sound.
    """
    if first is False or second is False:
        return False
    # Keeping the very object where one side adds nothing lets the walk recognise a recursive
    # `$ref` it has already entered (it compares schema objects by identity).
    if first is True or not _has_assertions(first):
        return second
    if second is True or not _has_assertions(second):
        return first
    merged = dict(first)
    for key, value in second.items():
        if key in ANNOTATION_KEYWORDS:
            merged.setdefault(key, value)
        elif key not in merged or merged[key] == value:
            merged[key] = value
        elif key == "type":
            both = restrict_types(declared_types(first), declared_types(second))
            merged[key] = sorted(both)
        elif key == "required":
            merged[key] = sorted(set(merged[key]) | set(value))
        elif key in ("properties", "patternProperties"):
            names = dict(merged[key])
            for name, subschema in value.items():
                names[name] = {"allOf": [names[name], subschema]} if name in names else subschema
            merged[key] = names
        else:
            return None
    return merged


class SubschemaCheck:
    """Walks one writer document against one reader document; `run()` lists the violations."""

    def __init__(self, writer: SchemaDocument, reader: SchemaDocument) -> None:
        self.writer = writer
        self.reader = reader
        self._assumed: set[tuple[int, int, frozenset[str] | None]] = set()
        self._depth = 0
        self._comparisons = 0

    @property
    def _exhausted(self) -> bool:
        return self._comparisons > _MAX_COMPARISONS

    def run(self) -> list[Violation]:
        for document, side in ((self.writer, "writer"), (self.reader, "reader")):
            deep = too_deep(document.root)
            if deep is not None:
                where = (deep, "") if side == "writer" else ("", deep)
                return [
                    self._unsupported(
                        f"the {side} schema nests more than {MAX_NESTING} objects and arrays deep",
                        "",
                        *where,
                    )
                ]
        writer_resource = self.writer.embedded_resource
        reader_resource = self.reader.embedded_resource
        if writer_resource is not None or reader_resource is not None:
            return [
                self._unsupported(
                    "a schema below the root has its own $id (an embedded resource, whose "
                    "references the check does not resolve)",
                    "",
                    f"{writer_resource}/$id" if writer_resource is not None else "",
                    f"{reader_resource}/$id" if reader_resource is not None else "",
                )
            ]
        found = self.check(self.writer.root, "", self.reader.root, "", "")
        if self._exhausted:
            # Added here, not where the budget ran out: a reader's anyOf may drop the failing
            # attempts of a branch, and what ran out must still count.
            found.append(
                self._unsupported(
                    f"the schemas are too large to analyse (more than {_MAX_COMPARISONS} "
                    "subschema comparisons); the violations listed may be incomplete",
                    "",
                    "",
                    "",
                )
            )
        return found

    def violation(self, rule: str, message: str, ip: str, wp: str, rp: str) -> Violation:
        return Violation(
            rule=rule, message=message, instance_path=ip, writer_path=wp, reader_path=rp
        )

    def check(
        self,
        writer: Any,
        wp: str,
        reader: Any,
        rp: str,
        ip: str,
        only: frozenset[str] | None = None,
    ) -> list[Violation]:
        """Violations of "every instance of `writer` (at `ip`) is valid under `reader`"."""
        if (
            self._exhausted
            or reader is True
            or (isinstance(reader, Mapping) and not _has_assertions(reader))
        ):
            return []
        alternatives = self._writer_alternatives(writer, wp, ip, expanding=())
        if isinstance(alternatives, Violation):
            return [alternatives]
        found: list[Violation] = []
        for plain, pointer in alternatives:
            found.extend(self._check_plain_writer(plain, pointer, reader, rp, ip, only))
        return found

    # The writer's side: combinators become a union of plain schemas.

    def _writer_alternatives(
        self, writer: Schema, wp: str, ip: str, expanding: tuple[str, ...]
    ) -> list[Plain] | Violation:
        if isinstance(writer, bool) or not (_COMBINATORS & writer.keys()):
            return [(writer, wp)]
        base = {key: value for key, value in writer.items() if key not in _COMBINATORS}
        result: list[Plain] = [(base, wp)]
        parts: list[list[Plain]] = []
        if "$ref" in writer:
            ref = writer["$ref"]
            if ref in expanding:
                return self._unsupported(f"$ref {ref!r} refers to itself", ip, wp, "")
            try:
                target, pointer = self.writer.resolve(ref)
            except UnresolvableRef as error:
                return self._unsupported(str(error), ip, wp + "/$ref", "")
            expanded = self._writer_alternatives(target, pointer, ip, (*expanding, ref))
            if isinstance(expanded, Violation):
                return expanded
            parts.append(expanded)
        for index, branch in enumerate(writer.get("allOf", ())):
            expanded = self._writer_alternatives(branch, f"{wp}/allOf/{index}", ip, expanding)
            if isinstance(expanded, Violation):
                return expanded
            parts.append(expanded)
        for keyword in ("anyOf", "oneOf"):
            # oneOf's instances are a subset of anyOf's: reading it as anyOf is sound.
            union: list[Plain] = []
            for index, branch in enumerate(writer.get(keyword, ())):
                expanded = self._writer_alternatives(
                    branch, f"{wp}/{keyword}/{index}", ip, expanding
                )
                if isinstance(expanded, Violation):
                    return expanded
                union.extend(expanded)
            if len(union) > _MAX_ALTERNATIVES:
                return self._too_many_alternatives(ip, wp)
            if keyword in writer:
                parts.append(union)
        for part in parts:
            combined: list[Plain] = []
            for left, left_pointer in result:
                for right, right_pointer in part:
                    merged = _merge(left, right)
                    if merged is None:
                        return self._unsupported(
                            "the writer schema combines subschemas whose keywords overlap "
                            "(allOf/$ref/anyOf with conflicting siblings)",
                            ip,
                            wp,
                            "",
                        )
                    keep_left = isinstance(left, Mapping) and _has_assertions(left)
                    combined.append((merged, left_pointer if keep_left else right_pointer))
            if len(combined) > _MAX_ALTERNATIVES:
                return self._too_many_alternatives(ip, wp)
            result = combined
        return result

    def _too_many_alternatives(self, ip: str, wp: str) -> Violation:
        return self._unsupported(
            f"the writer schema's combinators expand to more than {_MAX_ALTERNATIVES} alternatives",
            ip,
            wp,
            "",
        )

    def _unsupported(self, why: str, ip: str, wp: str, rp: str) -> Violation:
        return self.violation(
            "unsupported-construct", f"cannot prove compatible: {why}", ip, wp, rp
        )

    # A plain writer against any reader.

    def _check_plain_writer(
        self,
        writer: Schema,
        wp: str,
        reader: Schema,
        rp: str,
        ip: str,
        only: frozenset[str] | None,
    ) -> list[Violation]:
        if writer is False or reader is True:
            return []
        if reader is False:
            return [
                self.violation(
                    "reader-accepts-nothing",
                    "the reader's schema is false here, so any value written here is refused",
                    ip,
                    wp,
                    rp,
                )
            ]
        writer_map: Mapping[str, Any] = {} if writer is True else writer
        key = (id(writer_map), id(reader), only)
        if key in self._assumed:
            # The same pair is being checked further up: a recursive schema. Assuming it holds
            # is the standard (coinductive) reading of recursive types.
            return []
        if self._depth >= _MAX_DEPTH:
            return [self._unsupported("the schemas nest too deep to analyse", ip, wp, rp)]
        self._comparisons += 1
        if self._exhausted:
            return []  # run() reports it
        self._assumed.add(key)
        self._depth += 1
        try:
            values = self._finite_values(writer_map, wp, only)
            if values is not None:
                return self._check_values(values, ip, wp, reader, rp)
            return self._check_against_reader(writer_map, wp, reader, rp, ip, only)
        finally:
            self._depth -= 1
            self._assumed.discard(key)

    def _finite_values(
        self, writer: Mapping[str, Any], wp: str, only: frozenset[str] | None
    ) -> list[Any] | None:
        """Every value the writer may produce, when that is a short list; else None."""
        if "const" in writer:
            candidates = [writer["const"]]
        elif "enum" in writer:
            candidates = list(writer["enum"])
        elif restrict_types(declared_types(writer), only) <= {"null", "boolean"}:
            candidates = [None, True, False]
        else:
            return None
        # What ingest accepts is what a writer can have written. A writer merged from
        # several subschemas is in no document to validate with: all its listed values are
        # kept, which only enlarges the writer.
        ingest = self.writer.ingest_validator(wp, writer)
        return [
            value
            for value in candidates
            if (only is None or restrict_types(frozenset({json_type(value)}), only))
            and (ingest is None or ingest.is_valid(value))
        ]

    def _check_values(
        self, values: Iterable[Any], ip: str, wp: str, reader: Schema, rp: str
    ) -> list[Violation]:
        ingest = self.reader.ingest_validator(rp, reader)
        if ingest is None:
            return [
                self._unsupported(
                    "the reader's subschema cannot be validated as ingest validates it", ip, wp, rp
                )
            ]
        # Ingest's validator is the reader that counts (formats asserted, ECMA 262 regexes
        # without exponential backtracking); jsonschema's `re` differs on all three.
        return [
            self.violation(
                "value-refused",
                f"the writer may write {json.dumps(value)}, which the reader's schema refuses",
                ip,
                wp,
                rp,
            )
            for value in values
            if not ingest.is_valid(value)
        ]

    def _check_against_reader(
        self,
        writer: Mapping[str, Any],
        wp: str,
        reader: Mapping[str, Any],
        rp: str,
        ip: str,
        only: frozenset[str] | None,
    ) -> list[Violation]:
        found: list[Violation] = []
        if _COMBINATORS & reader.keys():
            found.extend(self._reader_combinators(writer, wp, reader, rp, ip, only))
            reader = {key: value for key, value in reader.items() if key not in _COMBINATORS}
        for keyword in sorted(reader.keys() & (_ASSERTING_KEYWORDS - ANALYSED_KEYWORDS)):
            found.append(self._unsupported(f"the reader uses {keyword}", ip, wp, f"{rp}/{keyword}"))
        declaring = {"if", "then", "else", "dependentSchemas", "unevaluatedProperties"}
        declaring |= {"unevaluatedItems", "$dynamicRef", "$recursiveRef"}
        for keyword in sorted(writer.keys() & declaring):
            found.append(self._unsupported(f"the writer uses {keyword}", ip, f"{wp}/{keyword}", rp))
        accepted = self._check_types(writer, wp, reader, rp, ip, only, found)
        if not accepted:
            return found
        for keyword in ("enum", "const"):
            if keyword in reader:
                found.append(
                    self.violation(
                        f"{keyword}-added",
                        f"the reader allows only {json.dumps(reader[keyword])} here, "
                        "the writer is not limited to those values",
                        ip,
                        wp,
                        f"{rp}/{keyword}",
                    )
                )
        if accepted & {"integer", "number"}:
            found.extend(check_numbers(self, writer, wp, reader, rp, ip, "number" in accepted))
        if "string" in accepted:
            found.extend(check_strings(self, writer, wp, reader, rp, ip))
        if "object" in accepted:
            found.extend(check_objects(self, writer, wp, reader, rp, ip))
        if "array" in accepted:
            found.extend(check_arrays(self, writer, wp, reader, rp, ip))
        return found

    def _check_types(
        self,
        writer: Mapping[str, Any],
        wp: str,
        reader: Mapping[str, Any],
        rp: str,
        ip: str,
        only: frozenset[str] | None,
        found: list[Violation],
    ) -> frozenset[str]:
        """The writer's types that the reader accepts; a violation for each other one."""
        writer_types = restrict_types(declared_types(writer), only)
        reader_types = declared_types(reader)
        accepted = set()
        for name in sorted(writer_types):
            if name in reader_types or (name == "integer" and "number" in reader_types):
                accepted.add(name)
            elif name == "number" and "integer" in reader_types:
                accepted.add("integer")
                found.append(
                    self.violation(
                        "type-narrowed",
                        "the writer may write any number, the reader accepts only integers",
                        ip,
                        wp,
                        f"{rp}/type",
                    )
                )
            else:
                found.append(
                    self.violation(
                        "type-refused",
                        f"the writer may write a {name}, the reader accepts only "
                        f"{' or '.join(sorted(reader_types))}",
                        ip,
                        wp,
                        f"{rp}/type",
                    )
                )
        return frozenset(accepted)

    def _reader_combinators(
        self,
        writer: Mapping[str, Any],
        wp: str,
        reader: Mapping[str, Any],
        rp: str,
        ip: str,
        only: frozenset[str] | None,
    ) -> list[Violation]:
        found: list[Violation] = []
        if "$ref" in reader:
            try:
                target, pointer = self.reader.resolve(reader["$ref"])
            except UnresolvableRef as error:
                return [self._unsupported(str(error), ip, wp, f"{rp}/$ref")]
            found.extend(self.check(writer, wp, target, pointer, ip, only))
        for index, branch in enumerate(reader.get("allOf", ())):
            found.extend(self.check(writer, wp, branch, f"{rp}/allOf/{index}", ip, only))
        if "anyOf" in reader:
            found.extend(self._check_union(writer, wp, reader["anyOf"], f"{rp}/anyOf", ip, only))
        if "oneOf" in reader:
            branches = reader["oneOf"]
            if self._types_disjoint(branches):
                # Branches that share no type can never both match: oneOf is then anyOf.
                found.extend(self._check_union(writer, wp, branches, f"{rp}/oneOf", ip, only))
            else:
                found.append(
                    self._unsupported(
                        "the reader's oneOf has branches that may overlap (declare a distinct "
                        "type per branch, or use anyOf)",
                        ip,
                        wp,
                        f"{rp}/oneOf",
                    )
                )
        return found

    def _types_disjoint(self, branches: Sequence[Schema]) -> bool:
        seen: set[str] = set()
        for branch in branches:
            if isinstance(branch, Mapping) and "$ref" in branch:
                try:
                    branch, _ = self.reader.resolve(branch["$ref"])
                except UnresolvableRef:
                    return False
            if not isinstance(branch, Mapping) or "type" not in branch:
                return False
            types = set(declared_types(branch))
            if "number" in types:
                types.add("integer")
            if "integer" in types:
                types.add("number")
            if types & seen:
                return False
            seen |= types
        return True

    def _check_union(
        self,
        writer: Mapping[str, Any],
        wp: str,
        branches: Sequence[Schema],
        rp: str,
        ip: str,
        only: frozenset[str] | None,
    ) -> list[Violation]:
        """Each type the writer may write must fit wholly in one branch (sound, not complete:
        a type split across two branches is reported)."""
        found: list[Violation] = []
        for name in sorted(restrict_types(declared_types(writer), only)):
            attempts = [
                self.check(writer, wp, branch, f"{rp}/{index}", ip, frozenset({name}))
                for index, branch in enumerate(branches)
            ]
            if all(attempts):
                closest = min(attempts, key=len)
                found.append(
                    self.violation(
                        "no-branch-accepts",
                        f"a {name} the writer may write fits none of the reader's "
                        f"{rp.rsplit('/', 1)[-1]} branches (the closest fails as listed next)",
                        ip,
                        wp,
                        rp,
                    )
                )
                found.extend(closest)
        return found
