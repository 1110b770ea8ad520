"""A schema document as the compatibility check walks it: local `$ref` resolution and the
keyword vocabulary the check understands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Any
from urllib.parse import quote, unquote

import jsonschema_rs

__all__ = [
    "ANALYSED_KEYWORDS",
    "ANNOTATION_KEYWORDS",
    "MAX_NESTING",
    "WRITER_IGNORABLE_KEYWORDS",
    "SchemaDocument",
    "UnresolvableRef",
    "too_deep",
]

MAX_NESTING = 64
"""Objects and arrays nested in a schema document, at most (some 30 levels of subschemas): the
meta-schema check and the compatibility walk recurse per level, and Python's stack does not
take a few hundred."""

# Keywords that never change which instances are valid (annotations, identifiers, containers of
# definitions): both sides may carry any of them, they play no part in the verdict. `default` is
# one: a Draft 2020-12 validator does not fill defaults in, so a default never makes a missing
# property present.
ANNOTATION_KEYWORDS = frozenset(
    {
        "$schema",
        "$id",
        "$anchor",
        "$dynamicAnchor",
        "$vocabulary",
        "$comment",
        "$defs",
        "definitions",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    }
)

# Keywords the check reasons about exactly (or soundly, where it says so).
ANALYSED_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "$ref",
        "allOf",
        "anyOf",
        "oneOf",
        # numbers
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        # strings
        "minLength",
        "maxLength",
        "pattern",
        "format",
        # objects
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "minProperties",
        "maxProperties",
        # arrays
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "uniqueItems",
    }
)

# Assertions that only ever remove instances and never declare a property a writer may produce:
# on the writer's side, ignoring one makes the writer's set of instances larger, so a verdict of
# "compatible" stays true. On the reader's side they are not analysed (reported as unsupported).
WRITER_IGNORABLE_KEYWORDS = frozenset(
    {"not", "dependentRequired", "propertyNames", "contains", "minContains", "maxContains"}
)


_DOCUMENT_URI = "urn:streammesh:schema-document"
# What a JSON Pointer may keep as it is in a URI fragment (RFC 3986); the rest is %-encoded.
_FRAGMENT_SAFE = "/~!$&'()*+,;=:@"


def too_deep(document: Any) -> str | None:
    """The JSON Pointer of the first object or array nested deeper than MAX_NESTING in
    `document`, or None (iterative, so any depth is measured without recursing)."""
    stack: list[tuple[Any, str, int]] = [(document, "", 1)]
    while stack:
        node, pointer, depth = stack.pop()
        children: Iterable[tuple[Any, Any]]
        if isinstance(node, Mapping):
            children = node.items()
        elif isinstance(node, list):
            children = enumerate(node)
        else:
            continue
        if depth > MAX_NESTING:
            return pointer
        for key, child in children:
            token = str(key).replace("~", "~0").replace("/", "~1")
            stack.append((child, f"{pointer}/{token}", depth + 1))
    return None


class UnresolvableRef(Exception):
    """A `$ref` that is not a JSON Pointer into the same document, or points at nothing."""


class SchemaDocument:
    """One schema document (a registered version or the candidate) and its local references."""

    def __init__(self, root: Mapping[str, Any] | bool, *, name: str) -> None:
        self.root = root
        self.name = name
        """"old", "new" or "version N": how messages name this document."""

    @cached_property
    def embedded_resource(self) -> str | None:
        """The pointer of a schema below the root that has its own `$id`, if any. Such a schema
        starts a resource with its own base URI, so its `#/...` references point into it, not
        into the root: the walk, which resolves every local reference against the root, does
        not analyse such a document. (A `$id` string in `const` or `enum` data counts too; it
        only makes the verdict "cannot prove".)"""
        stack: list[tuple[Any, str]] = [(self.root, "")]
        while stack:
            node, pointer = stack.pop()
            children: Iterable[tuple[Any, Any]]
            if isinstance(node, Mapping):
                if pointer and isinstance(node.get("$id"), str):
                    return pointer
                children = node.items()
            elif isinstance(node, list):
                children = enumerate(node)
            else:
                continue
            for key, child in children:
                token = str(key).replace("~", "~0").replace("/", "~1")
                stack.append((child, f"{pointer}/{token}"))
        return None

    @cached_property
    def _registry(self) -> jsonschema_rs.Registry | None:
        try:
            root = dict(self.root) if isinstance(self.root, Mapping) else self.root
            return jsonschema_rs.Registry([(_DOCUMENT_URI, root)])
        except (ValueError, jsonschema_rs.ReferencingError):
            return None

    def ingest_validator(self, pointer: str, schema: Any) -> jsonschema_rs.Validator | None:
        """A validator of `schema`, the document's subschema at `pointer`, as ingest validates
        (jsonschema-rs: formats asserted, ECMA 262 regexes, references resolved in the
        document); None when `schema` is not the node at `pointer` or does not compile."""
        if self._node(pointer) is not schema or self._registry is None:
            return None
        cached = self._validators.get(pointer)
        if cached is None:
            reference = {"$ref": f"{_DOCUMENT_URI}#{quote(pointer, safe=_FRAGMENT_SAFE)}"}
            try:
                cached = jsonschema_rs.Draft202012Validator(
                    reference, registry=self._registry, validate_formats=True
                )
            except (ValueError, jsonschema_rs.ReferencingError):
                return None
            self._validators[pointer] = cached
        return cached

    @cached_property
    def _validators(self) -> dict[str, jsonschema_rs.Validator]:
        return {}

    def _node(self, pointer: str) -> Any:
        node: Any = self.root
        for raw in pointer.split("/")[1:]:
            token = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                return None
        return node

    def resolve(self, ref: str) -> tuple[Any, str]:
        """The schema a local `$ref` ("#" or "#/json/pointer") names, and its pointer.

        Remote references and `$anchor` names are not followed: the registry stores
        self-contained documents, and a schema that needs more is reported, not guessed at.
        """
        if not ref.startswith("#") or (len(ref) > 1 and ref[1] != "/"):
            raise UnresolvableRef(
                f"$ref {ref!r} is not a JSON Pointer into the same document (only '#/...' is supported)"
            )
        pointer = unquote(ref[1:])
        node = self._node(pointer)
        if node is None:
            raise UnresolvableRef(f"$ref {ref!r} points at nothing in the {self.name} schema")
        if not isinstance(node, Mapping | bool):
            raise UnresolvableRef(f"$ref {ref!r} does not point at a schema")
        return node, pointer
