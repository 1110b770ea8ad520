"""Soundness and cost cases found in review: each pair below is one where old writers (or new
ones) write an instance that the other side refuses, checked with a real validator, so the
checker must not call it compatible; and schemas whose analysis must stay bounded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.ingest.payload_schema import PayloadValidator
from services.storage.schemas import (
    CompatibilityMode,
    PreviousVersion,
    check_compatibility,
    schema_problems,
)
from tests.storage.schema_witnesses import reader_validator, writer_validator


def _backward(old: Any, new: Any) -> set[str]:
    report = check_compatibility(new, [PreviousVersion(1, old)], CompatibilityMode.BACKWARD)
    return {violation.rule for violation in report.violations}


def test_a_required_name_the_model_does_not_declare_is_still_written() -> None:
    # A writer must write `x` (required) with any value: its schema demands it, so the writer
    # assumption (only declared names) cannot take it away.
    old = {"type": "object", "required": ["x"]}
    new = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    witness = {"x": 5}
    assert writer_validator(old).is_valid(witness)
    assert not reader_validator(new).is_valid(witness)
    assert "type-refused" in _backward(old, new)


def test_a_required_undeclared_name_counts_toward_max_properties() -> None:
    old = {"type": "object", "properties": {"a": {}}, "required": ["b"]}
    new = {"type": "object", "maxProperties": 1}
    witness = {"a": 1, "b": 2}
    assert writer_validator(old).is_valid(witness)
    assert not reader_validator(new).is_valid(witness)
    assert "max-properties-lowered" in _backward(old, new)


def test_a_required_undeclared_name_takes_the_additional_properties_schema() -> None:
    old = {"type": "object", "additionalProperties": {"type": "integer"}, "required": ["n"]}
    new = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    witness = {"n": -1}
    assert writer_validator(old).is_valid(witness)
    assert not reader_validator(new).is_valid(witness)
    assert "minimum-raised" in _backward(old, new)


def _doubling(levels: int) -> dict[str, Any]:
    """A small document whose property tree has 2**levels paths (no cycle: each level names
    the next twice)."""
    defs: dict[str, Any] = {
        f"d{i}": {
            "type": "object",
            "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}, "b": {"$ref": f"#/$defs/d{i + 1}"}},
        }
        for i in range(levels)
    }
    defs[f"d{levels}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def test_a_property_tree_that_doubles_per_level_is_bounded_not_walked() -> None:
    assert _backward(_doubling(4), _doubling(4)) == set()
    # 2**40 paths: refused as too large to analyse (cannot prove compatible), in bounded work.
    assert _backward(_doubling(40), _doubling(40)) == {"unsupported-construct"}


def test_alternatives_that_multiply_are_bounded_not_enumerated() -> None:
    either = {
        "anyOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}},
            {"type": "object", "properties": {"b": {"type": "string"}}},
        ]
    }
    # allOf of 40 parts of two alternatives each: 2**40 plain writers.
    writer = {"$defs": {"either": either}, "allOf": [{"$ref": "#/$defs/either"}] * 40}
    assert _backward(writer, {"type": "object"}) == {"unsupported-construct"}


def _ingest_refuses(schema: Any, instance: Any) -> bool:
    return bool(PayloadValidator(schema).errors(json.dumps(instance).encode()))


def test_values_of_a_finite_writer_meet_the_readers_formats_as_ingest_asserts_them() -> None:
    # The module's stated reading (and ingest's): `format` asserts. A writer limited to listed
    # values is decided by validating each value, so that validation must assert formats too.
    old = {"type": "object", "properties": {"e": {"const": "not-an-email"}}, "required": ["e"]}
    new = {"type": "object", "properties": {"e": {"type": "string", "format": "email"}}}
    assert _ingest_refuses(new, {"e": "not-an-email"})
    assert "value-refused" in _backward(old, new)
    assert _backward({"enum": ["P1D", "PT5M"]}, {"type": "string", "format": "duration"}) == set()
    assert "value-refused" in _backward(
        {"enum": ["P1D", "bogus"]}, {"type": "string", "format": "duration"}
    )


def test_values_of_a_finite_writer_meet_the_readers_patterns_as_ecma_262_reads_them() -> None:
    # Python's `$` also matches before a final newline; ECMA 262's (ingest's) does not.
    old = {"type": "object", "properties": {"k": {"const": "a\n"}}}
    new = {"type": "object", "properties": {"k": {"type": "string", "pattern": "^a$"}}}
    assert _ingest_refuses(new, {"k": "a\n"})
    assert "value-refused" in _backward(old, new)


def test_a_reference_inside_an_embedded_resource_is_not_resolved_against_the_root() -> None:
    # `$id` below the root starts a resource: its "#/$defs/b" is its own b (a string), not the
    # root's (an integer).
    embedded = {"$id": "https://example.com/a", "$defs": {"b": {"type": "string"}}}
    old = {
        "$defs": {"b": {"type": "integer"}, "a": {**embedded, "$ref": "#/$defs/b"}},
        "$ref": "#/$defs/a",
    }
    new = {"type": "integer"}
    assert not _ingest_refuses(old, "s") and _ingest_refuses(new, "s")
    assert reader_validator(old).is_valid("s") and not reader_validator(new).is_valid("s")
    assert "unsupported-construct" in _backward(old, new)


ECMA_ONLY_PATTERNS = ["(?<n>x)", "\\p{L}"]
"""Valid ECMA 262 regexes (the registry accepts them: ingest compiles them) that Python's `re`
cannot compile."""


@pytest.mark.parametrize("pattern", ECMA_ONLY_PATTERNS)
def test_an_ecma_only_regex_gives_a_verdict_not_an_exception(pattern: str) -> None:
    finite = {"enum": ["x", "1"]}
    with_pattern = {"type": "string", "pattern": pattern}
    assert schema_problems(with_pattern) == []
    assert PayloadValidator(with_pattern).errors(b'"x"') == []
    assert PayloadValidator(with_pattern).errors(b'"1"') != []
    # Reader side: ingest refuses "1", so the change is refused (and does not raise).
    assert _backward(finite, with_pattern) == {"value-refused"}
    # Writer side: the writer's own pattern narrows its values to "x".
    assert _backward({**with_pattern, "enum": ["x", "1"]}, {"enum": ["x"]}) == set()
    objects = {"type": "object", "patternProperties": {pattern: {"type": "integer"}}}
    assert "value-refused" in _backward({"const": {"x": "s"}}, objects)


def test_a_backtracking_regex_against_long_names_and_values_stays_cheap() -> None:
    # Python's `re` takes seconds at 26 characters and doubles per character on this one;
    # ingest's engine (and so the check) does not backtrack like that.
    pattern = "^(a+)+$"
    name = "a" * 64 + "!"
    reader = {"type": "object", "patternProperties": {pattern: {"type": "integer"}}}
    writer = {"type": "object", "properties": {name: {"type": "string"}}}
    assert _backward(writer, reader) == set()
    assert _backward({"enum": [name]}, {"type": "string", "pattern": pattern}) == {"value-refused"}
