"""The table of schema changes and their verdicts, each justified from JSON Schema semantics
(Draft 2020-12) and the writer assumption documented in services.storage.schemas.compatibility:
writers of an object model write only the properties it declares.

BACKWARD: the new schema must accept everything old writers write. FORWARD: the old schema
must accept everything new writers write. A direction that breaks names a witness: an instance
old (resp. new) writers may write that the other schema refuses, plus the rule the checker must
report for it. With one previous version, the transitive modes equal the plain ones; the chains
at the end tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CHAINS", "CHANGES", "UNPROVABLE", "Breaks", "Chain", "Change", "Unprovable"]


@dataclass(frozen=True)
class Breaks:
    """The direction is incompatible: `witness` is written by one side and refused by the other."""

    witness: Any
    rule: str


COMPATIBLE = None


@dataclass(frozen=True)
class Change:
    name: str
    old: Any
    new: Any
    backward: Breaks | None
    forward: Breaks | None
    why: str


def obj(
    properties: dict[str, Any], required: tuple[str, ...] = (), closed: bool = False, **more: Any
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, **more}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def tree(node: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recursive schema: a node with `node`'s properties and a list of child nodes."""
    children = {"type": "array", "items": {"$ref": "#/$defs/node"}}
    return {
        "$defs": {"node": obj({**node, "children": children}, required)},
        "$ref": "#/$defs/node",
    }


S = {"type": "string"}
I = {"type": "integer"}  # noqa: E741 (the schema of an integer)
N = {"type": "number"}

CHANGES: list[Change] = [
    # --- properties and the open content model (where Confluent and Apicurio refuse) ---
    Change(
        "add optional property, open model",
        obj({"a": S}, ("a",)),
        obj({"a": S, "b": I}, ("a",)),
        COMPATIBLE,
        COMPATIBLE,
        "old writers never write b, new readers do not require it; old readers are open to b",
    ),
    Change(
        "add optional property, closed model",
        obj({"a": S}, ("a",), closed=True),
        obj({"a": S, "b": I}, ("a",), closed=True),
        COMPATIBLE,
        Breaks({"a": "x", "b": 1}, "additional-properties-closed"),
        "new writers may write b, which the old closed model refuses",
    ),
    Change(
        "remove optional property, open model",
        obj({"a": S, "b": I}, ("a",)),
        obj({"a": S}, ("a",)),
        COMPATIBLE,
        COMPATIBLE,
        "the new open model accepts old writers' b of any value; new writers just omit b",
    ),
    Change(
        "remove optional property, closed model",
        obj({"a": S, "b": I}, ("a",), closed=True),
        obj({"a": S}, ("a",), closed=True),
        Breaks({"a": "x", "b": 1}, "additional-properties-closed"),
        COMPATIBLE,
        "old writers may write b, the new closed model refuses it",
    ),
    Change(
        "add required property",
        obj({"a": S}, ("a",)),
        obj({"a": S, "b": I}, ("a", "b")),
        Breaks({"a": "x"}, "required-added"),
        COMPATIBLE,
        "old data lacks b, which `required` demands; new data's b is fine for the open old model",
    ),
    Change(
        "add required property with a default",
        obj({"a": S}, ("a",)),
        obj({"a": S, "b": {"type": "integer", "default": 0}}, ("a", "b")),
        Breaks({"a": "x"}, "required-added"),
        COMPATIBLE,
        "`default` is an annotation: validation does not fill b in, so old data still fails",
    ),
    Change(
        "required property becomes optional",
        obj({"a": S, "b": I}, ("a", "b")),
        obj({"a": S, "b": I}, ("a",)),
        COMPATIBLE,
        Breaks({"a": "x"}, "required-added"),
        "old data always has b and it fits; new writers may omit b, which old readers require",
    ),
    Change(
        "optional property becomes required",
        obj({"a": S, "b": I}, ("a",)),
        obj({"a": S, "b": I}, ("a", "b")),
        Breaks({"a": "x"}, "required-added"),
        COMPATIBLE,
        "old writers may omit b; new data always has an integer b, which old readers accept",
    ),
    Change(
        "remove a required property, open model",
        obj({"a": S, "b": I}, ("a", "b")),
        obj({"a": S}, ("a",)),
        COMPATIBLE,
        Breaks({"a": "x"}, "required-added"),
        "new readers ignore old b (open model); new writers no longer write b, old readers need it",
    ),
    Change(
        "change a default",
        obj({"a": {"type": "string", "default": "x"}}),
        obj({"a": {"type": "string", "default": "y"}}),
        COMPATIBLE,
        COMPATIBLE,
        "`default` never changes validity",
    ),
    Change(
        "open model becomes closed",
        obj({"a": S}),
        obj({"a": S}, closed=True),
        COMPATIBLE,
        COMPATIBLE,
        "writers of the open model write only a (the assumption), which the closed one accepts",
    ),
    Change(
        "closed model becomes open",
        obj({"a": S}, closed=True),
        obj({"a": S}),
        COMPATIBLE,
        COMPATIBLE,
        "opening only adds accepted instances; new writers still write only a",
    ),
    Change(
        "additionalProperties schema narrowed",
        obj({"a": S}, additionalProperties={"type": ["string", "integer"]}),
        obj({"a": S}, additionalProperties=S),
        Breaks({"a": "x", "other": 1}, "type-refused"),
        COMPATIBLE,
        "old writers may write any other name with an integer, which the new string-only refuses",
    ),
    Change(
        "declare a property that additionalProperties typed otherwise",
        obj({"a": S}, additionalProperties=S),
        obj({"a": S, "b": I}, additionalProperties=S),
        Breaks({"a": "x", "b": "s"}, "type-refused"),
        Breaks({"a": "x", "b": 1}, "type-refused"),
        "old writers may write b as a string (additionalProperties), new ones as an integer",
    ),
    Change(
        "declare a property that additionalProperties already typed alike",
        obj({"a": S}, additionalProperties=S),
        obj({"a": S, "b": S}, additionalProperties=S),
        COMPATIBLE,
        COMPATIBLE,
        "b is a string on both sides, declared or not",
    ),
    Change(
        "patternProperties added to an open model",
        obj({"a": S}),
        obj({"a": S}, patternProperties={"^x_": I}),
        COMPATIBLE,
        COMPATIBLE,
        "old writers write only a (no x_ name); old readers are open to new x_ names",
    ),
    Change(
        "patternProperties narrowed",
        obj({"a": S}, patternProperties={"^x_": N}),
        obj({"a": S}, patternProperties={"^x_": I}),
        Breaks({"a": "x", "x_a": 1.5}, "type-narrowed"),
        COMPATIBLE,
        "old writers may write x_a = 1.5, not an integer",
    ),
    # --- types ---
    Change(
        "integer widened to number",
        obj({"n": I}),
        obj({"n": N}),
        COMPATIBLE,
        Breaks({"n": 1.5}, "type-narrowed"),
        "every integer is a number; 1.5 is not an integer",
    ),
    Change(
        "number narrowed to integer",
        obj({"n": N}),
        obj({"n": I}),
        Breaks({"n": 1.5}, "type-narrowed"),
        COMPATIBLE,
        "old writers may write 1.5",
    ),
    Change(
        "string changed to integer",
        obj({"n": S}),
        obj({"n": I}),
        Breaks({"n": "x"}, "type-refused"),
        Breaks({"n": 1}, "type-refused"),
        "the two types share no value",
    ),
    Change(
        "made nullable with a type list",
        obj({"n": S}),
        obj({"n": {"type": ["string", "null"]}}),
        COMPATIBLE,
        Breaks({"n": None}, "type-refused"),
        "a union keeps every string; old readers refuse null",
    ),
    Change(
        "made nullable with anyOf",
        obj({"n": S}),
        obj({"n": {"anyOf": [S, {"type": "null"}]}}),
        COMPATIBLE,
        Breaks({"n": None}, "value-refused"),
        "the string branch takes every old value; old readers refuse null",
    ),
    Change(
        "made nullable with a oneOf of distinct types",
        obj({"n": S}),
        obj({"n": {"oneOf": [S, {"type": "null"}]}}),
        COMPATIBLE,
        Breaks({"n": None}, "value-refused"),
        "branches of distinct types never both match, so each string matches exactly one",
    ),
    Change(
        "type removed from a union",
        obj({"n": {"type": ["string", "integer"]}}),
        obj({"n": S}),
        Breaks({"n": 1}, "type-refused"),
        COMPATIBLE,
        "old writers may write an integer",
    ),
    Change(
        "schema true becomes an object model",
        True,
        obj({"a": S}),
        Breaks(1, "type-refused"),
        COMPATIBLE,
        "a schema that declares nothing lets writers write anything, e.g. 1",
    ),
    # --- enum / const ---
    Change(
        "enum value added",
        obj({"s": {"enum": ["a", "b"]}}),
        obj({"s": {"enum": ["a", "b", "c"]}}),
        COMPATIBLE,
        Breaks({"s": "c"}, "value-refused"),
        "a superset of values; old readers refuse c",
    ),
    Change(
        "enum value removed",
        obj({"s": {"enum": ["a", "b", "c"]}}),
        obj({"s": {"enum": ["a", "b"]}}),
        Breaks({"s": "c"}, "value-refused"),
        COMPATIBLE,
        "old writers may write c",
    ),
    Change(
        "const widened to enum",
        obj({"s": {"const": "a"}}),
        obj({"s": {"enum": ["a", "b"]}}),
        COMPATIBLE,
        Breaks({"s": "b"}, "value-refused"),
        "a is still allowed; b is not a",
    ),
    Change(
        "enum imposed on a free string",
        obj({"s": S}),
        obj({"s": {"type": "string", "enum": ["a", "b"]}}),
        Breaks({"s": "zzz"}, "enum-added"),
        COMPATIBLE,
        "old writers may write any string; new values are strings",
    ),
    # --- string and number constraints ---
    Change(
        "minLength raised",
        obj({"s": {"type": "string", "minLength": 1}}),
        obj({"s": {"type": "string", "minLength": 3}}),
        Breaks({"s": "ab"}, "min-length-raised"),
        COMPATIBLE,
        "a 2-character string was valid",
    ),
    Change(
        "maxLength raised",
        obj({"s": {"type": "string", "maxLength": 5}}),
        obj({"s": {"type": "string", "maxLength": 10}}),
        COMPATIBLE,
        Breaks({"s": "abcdefg"}, "max-length-lowered"),
        "a looser bound keeps old values; 7 characters exceed the old 5",
    ),
    Change(
        "pattern added",
        obj({"s": S}),
        obj({"s": {"type": "string", "pattern": "^[a-z]+$"}}),
        Breaks({"s": "A"}, "pattern-changed"),
        COMPATIBLE,
        "'A' does not match; matching strings are strings",
    ),
    Change(
        "maximum lowered",
        obj({"n": {"type": "integer", "maximum": 100}}),
        obj({"n": {"type": "integer", "maximum": 10}}),
        Breaks({"n": 50}, "maximum-lowered"),
        COMPATIBLE,
        "50 was valid and exceeds 10",
    ),
    Change(
        "minimum made exclusive",
        obj({"n": {"type": "number", "minimum": 0}}),
        obj({"n": {"type": "number", "exclusiveMinimum": 0}}),
        Breaks({"n": 0}, "minimum-raised"),
        COMPATIBLE,
        "0 meets minimum 0 but not exclusiveMinimum 0",
    ),
    Change(
        "minimum removed",
        obj({"n": {"type": "number", "minimum": 0}}),
        obj({"n": N}),
        COMPATIBLE,
        Breaks({"n": -1}, "minimum-raised"),
        "no bound accepts everything; -1 was refused before",
    ),
    Change(
        "multipleOf added",
        obj({"n": I}),
        obj({"n": {"type": "integer", "multipleOf": 2}}),
        Breaks({"n": 1}, "multiple-of-added"),
        COMPATIBLE,
        "1 is not even; even integers are integers",
    ),
    # --- nested objects ---
    Change(
        "nested optional property added, open",
        obj({"addr": obj({"city": S})}),
        obj({"addr": obj({"city": S, "zip": S})}),
        COMPATIBLE,
        COMPATIBLE,
        "as at the top: old writers write no zip, old readers are open to it",
    ),
    Change(
        "nested required property added",
        obj({"addr": obj({"city": S})}),
        obj({"addr": obj({"city": S, "zip": S}, ("zip",))}),
        Breaks({"addr": {"city": "x"}}, "required-added"),
        COMPATIBLE,
        "old addresses lack zip",
    ),
    Change(
        "nested optional property added, closed",
        obj({"addr": obj({"city": S}, closed=True)}),
        obj({"addr": obj({"city": S, "zip": S}, closed=True)}),
        COMPATIBLE,
        Breaks({"addr": {"zip": "1"}}, "additional-properties-closed"),
        "old closed addresses refuse zip",
    ),
    # --- arrays ---
    Change(
        "array items widened",
        obj({"tags": {"type": "array", "items": S}}),
        obj({"tags": {"type": "array", "items": {"type": ["string", "integer"]}}}),
        COMPATIBLE,
        Breaks({"tags": [1]}, "type-refused"),
        "every string item still fits; an integer item did not",
    ),
    Change(
        "array items narrowed",
        obj({"tags": {"type": "array", "items": N}}),
        obj({"tags": {"type": "array", "items": I}}),
        Breaks({"tags": [1.5]}, "type-narrowed"),
        COMPATIBLE,
        "1.5 was a valid item",
    ),
    Change(
        "minItems raised",
        obj({"tags": {"type": "array", "items": S}}),
        obj({"tags": {"type": "array", "items": S, "minItems": 1}}),
        Breaks({"tags": []}, "min-items-raised"),
        COMPATIBLE,
        "the empty array was valid",
    ),
    Change(
        "maxItems added",
        obj({"tags": {"type": "array", "items": S}}),
        obj({"tags": {"type": "array", "items": S, "maxItems": 2}}),
        Breaks({"tags": ["a", "b", "c"]}, "max-items-lowered"),
        COMPATIBLE,
        "three items were valid",
    ),
    Change(
        "uniqueItems added",
        obj({"tags": {"type": "array", "items": S}}),
        obj({"tags": {"type": "array", "items": S, "uniqueItems": True}}),
        Breaks({"tags": ["a", "a"]}, "unique-items-added"),
        COMPATIBLE,
        "a repeated item was valid",
    ),
    Change(
        "closed tuple gains a position",
        obj({"p": {"type": "array", "prefixItems": [S], "items": False}}),
        obj({"p": {"type": "array", "prefixItems": [S, I], "items": False}}),
        COMPATIBLE,
        Breaks({"p": ["a", 1]}, "tuple-closed"),
        "old tuples have at most one string; the old schema refuses a second item",
    ),
    Change(
        "open tuple constrains its second position",
        obj({"p": {"type": "array", "prefixItems": [S]}}),
        obj({"p": {"type": "array", "prefixItems": [S, I]}}),
        Breaks({"p": ["a", "b"]}, "type-refused"),
        COMPATIBLE,
        "old position 1 was unconstrained; old readers accept anything after position 0",
    ),
    # --- $ref and $defs ---
    Change(
        "a $defs reference inlined",
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/name"}}, "$defs": {"name": S}},
        obj({"a": S}),
        COMPATIBLE,
        COMPATIBLE,
        "$ref to a definition validates exactly as the definition",
    ),
    Change(
        "a $defs definition widened",
        {"type": "object", "properties": {"m": {"$ref": "#/$defs/money"}}, "$defs": {"money": I}},
        {"type": "object", "properties": {"m": {"$ref": "#/$defs/money"}}, "$defs": {"money": N}},
        COMPATIBLE,
        Breaks({"m": 1.5}, "type-narrowed"),
        "as integer -> number, through the reference",
    ),
    Change(
        "a recursive tree gains an optional label",
        tree({"value": I}, ("value",)),
        tree({"value": I, "label": S}, ("value",)),
        COMPATIBLE,
        COMPATIBLE,
        "at every depth: an optional property added to an open model",
    ),
    Change(
        "a recursive tree's value narrowed",
        tree({"value": N}),
        tree({"value": I}),
        Breaks({"children": [{"value": 1.5}]}, "type-narrowed"),
        COMPATIBLE,
        "a child's 1.5 was valid",
    ),
]


@dataclass(frozen=True)
class Chain:
    """Three or more versions: the transitive modes compare with all, the plain ones with the
    latest. `expected` maps each mode to its verdict; `witnesses` maps (previous version,
    direction) to an instance that breaks that pair."""

    name: str
    versions: list[Any]
    expected: dict[str, bool]
    witnesses: dict[tuple[int, str], Any]
    why: str


CHAINS: list[Chain] = [
    Chain(
        "property removed, then added back with another type",
        [obj({"a": S}), obj({}), obj({"a": I})],
        {
            "NONE": True,
            "BACKWARD": True,
            "BACKWARD_TRANSITIVE": False,
            "FORWARD": True,
            "FORWARD_TRANSITIVE": False,
            "FULL": True,
            "FULL_TRANSITIVE": False,
        },
        {(1, "BACKWARD"): {"a": "x"}, (1, "FORWARD"): {"a": 1}},
        "v2 writers write no a; v1 writers write a string the v3 integer refuses, and back",
    ),
    Chain(
        "a maximum raised twice",
        [
            obj({"n": {"type": "integer", "maximum": 10}}),
            obj({"n": {"type": "integer", "maximum": 100}}),
            obj({"n": {"type": "integer", "maximum": 1000}}),
        ],
        {
            "NONE": True,
            "BACKWARD": True,
            "BACKWARD_TRANSITIVE": True,
            "FORWARD": False,
            "FORWARD_TRANSITIVE": False,
            "FULL": False,
            "FULL_TRANSITIVE": False,
        },
        {(2, "FORWARD"): {"n": 500}, (1, "FORWARD"): {"n": 500}},
        "each step widens, so every older value fits; 500 exceeds both older maxima",
    ),
]


@dataclass(frozen=True)
class Unprovable:
    """A change that uses a construct the checker does not analyse: it must answer
    `unsupported-construct` in the direction given, whatever the truth."""

    name: str
    old: Any
    new: Any
    direction: str
    why: str


UNPROVABLE: list[Unprovable] = [
    Unprovable(
        "reader's oneOf with overlapping branches",
        obj({"n": S}),
        obj({"n": {"oneOf": [S, {"type": "string", "maxLength": 3}]}}),
        "BACKWARD",
        "'ab' matches both branches, so oneOf refuses it: overlap needs a real decision",
    ),
    Unprovable(
        "reader's if/then/else",
        obj({"n": I}),
        obj({"n": {"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 100}}}),
        "BACKWARD",
        "conditionals are not analysed",
    ),
    Unprovable(
        "reader's not (true here, yet not proven)",
        obj({"n": I}),
        obj({"n": {"type": "integer", "not": {"type": "string"}}}),
        "BACKWARD",
        "`not` is not analysed on the reader's side; an integer is never a string, but the "
        "checker says it cannot prove it rather than guess",
    ),
    Unprovable(
        "a remote $ref",
        obj({"n": I}),
        obj({"n": {"$ref": "https://example.com/n.json"}}),
        "BACKWARD",
        "the registry does not fetch schemas",
    ),
]
