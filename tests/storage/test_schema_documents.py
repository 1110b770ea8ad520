"""A submitted schema must be a valid, self-contained Draft 2020-12 document; each refusal names
the bad part by JSON Pointer."""

from __future__ import annotations

from typing import Any

import pytest

from services.storage.schemas import (
    DRAFT_2020_12,
    PreviousVersion,
    SchemaProblem,
    check_compatibility,
    schema_problems,
)


@pytest.mark.parametrize(
    "schema",
    [
        True,
        {},
        {"$schema": DRAFT_2020_12, "type": "object", "properties": {"a": {"type": "string"}}},
        {"$schema": DRAFT_2020_12 + "#"},
        {"$defs": {"n": {"type": "integer"}}, "properties": {"n": {"$ref": "#/$defs/n"}}},
        {"prefixItems": [{"type": "string"}], "items": False},
        {"patternProperties": {"^x_[a-z]+$": {"type": "number"}}},
        # ECMA 262 (and ingest's engine) reads \p{L}; Python's re would not.
        {"properties": {"name": {"type": "string", "pattern": "^\\p{L}+$"}}},
        # A "$ref" key inside data (enum values, defaults) is not a reference.
        {"enum": [{"$ref": "#/nowhere"}], "default": {"$ref": "#/nowhere"}},
    ],
)
def test_valid_documents_pass(schema: Any) -> None:
    assert schema_problems(schema) == []


@pytest.mark.parametrize(
    ("schema", "path", "words"),
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "/properties/a/type", "strin"),
        ({"properties": {"a": {"minLength": -1}}}, "/properties/a/minLength", "minimum"),
        ({"required": "a"}, "/required", "not of type 'array'"),
        ({"properties": {"s": {"pattern": "("}}}, "/properties/s/pattern", "regex"),
        ({"patternProperties": {"(": {}}}, "/patternProperties/(", "regex"),
        ({"$schema": "http://json-schema.org/draft-07/schema#"}, "/$schema", "Draft 2020-12"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "/properties/a/$ref", "nothing"),
        ({"items": {"$ref": "https://example.com/x.json"}}, "/items/$ref", "same document"),
        ({"$dynamicRef": "#meta"}, "/$dynamicRef", "not supported"),
        ([1, 2], "", "JSON object"),
    ],
)
def test_each_problem_names_the_bad_part(schema: Any, path: str, words: str) -> None:
    problems = schema_problems(schema)
    assert problems, schema
    assert any(p.path == path and words in p.message for p in problems), problems


def test_every_problem_is_listed() -> None:
    problems = schema_problems({"properties": {"a": {"type": 3}, "b": {"maxItems": "x"}}})
    assert {p.path for p in problems} == {"/properties/a/type", "/properties/b/maxItems"}
    assert all(isinstance(p, SchemaProblem) for p in problems)


def _nested(keyword: str, levels: int) -> Any:
    schema: Any = {"type": "string"}
    for _ in range(levels):
        schema = {keyword: [schema]} if keyword == "allOf" else {keyword: {"a": schema}}
    return schema


@pytest.mark.parametrize("keyword", ["allOf", "properties"])
def test_a_deeply_nested_document_is_a_problem_not_an_exception(keyword: str) -> None:
    # The meta-schema check recursed past Python's limit at some 90 levels of allOf.
    assert schema_problems(_nested(keyword, 20)) == []
    for levels in (100, 3000):
        problems = schema_problems(_nested(keyword, levels))
        assert len(problems) == 1 and "nested" in problems[0].message, problems
        assert problems[0].path.startswith(f"/{keyword}/")


def test_the_compatibility_check_of_a_deeply_nested_document_answers() -> None:
    deep = _nested("allOf", 3000)
    report = check_compatibility(deep, [PreviousVersion(1, {"type": "string"})])
    assert {violation.rule for violation in report.violations} == {"unsupported-construct"}
    report = check_compatibility({"type": "string"}, [PreviousVersion(1, deep)])
    assert {violation.rule for violation in report.violations} == {"unsupported-construct"}
