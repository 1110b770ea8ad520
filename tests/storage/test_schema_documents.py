"""A submitted schema must be a valid, self-contained Draft 2020-12 document; each refusal names
the bad part by JSON Pointer."""

from __future__ import annotations

from typing import Any

import pytest

from services.storage.schemas import DRAFT_2020_12, SchemaProblem, schema_problems


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
