"""The filter language without a database: the tree the parser builds (AIP-160 precedence), the
errors it gives with their columns, payload fields from JSON Schemas, and the type checks."""

from __future__ import annotations

from typing import Any

import pytest

from services.storage.filters import (
    MAX_FILTER_CHARS,
    MAX_FILTER_DEPTH,
    FieldScope,
    FilterError,
    compile_filter,
    payload_fields,
)
from services.storage.filters.fields import MAX_PAYLOAD_FIELDS
from services.storage.filters.syntax import And, Node, Not, Or, Restriction, parse_filter
from streammesh.mesh.errors import InvalidArgument
from tests.storage.test_filter_sql import ORDER_CREATED

ORDER = payload_fields(ORDER_CREATED)
SCOPE = FieldScope({"order.created": ORDER})


def shape(node: Node | None) -> Any:
    """The tree as nested tuples: ("AND", ...), ("OR", ...), ("NOT", x), or the member path."""
    if isinstance(node, Restriction):
        return node.member.path
    if isinstance(node, Not):
        return ("NOT", shape(node.item))
    assert isinstance(node, And | Or)
    return ("AND" if isinstance(node, And) else "OR", *(shape(item) for item in node.items))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=1", "a"),
        ("a=1 AND b=1", ("AND", "a", "b")),
        ("a=1 b=1", ("AND", "a", "b")),
        ("a=1 OR b=1", ("OR", "a", "b")),
        # OR binds tighter than the sequence, which binds tighter than AND (AIP-160)
        ("a=1 AND b=1 OR c=1", ("AND", "a", ("OR", "b", "c"))),
        ("a=1 OR b=1 AND c=1", ("AND", ("OR", "a", "b"), "c")),
        ("a=1 b=1 OR c=1 AND d=1", ("AND", ("AND", "a", ("OR", "b", "c")), "d")),
        ("(a=1 AND b=1) OR c=1", ("OR", ("AND", "a", "b"), "c")),
        ("NOT a=1 OR b=1", ("OR", ("NOT", "a"), "b")),
        ("-a=1 b=1", ("AND", ("NOT", "a"), "b")),
        ("NOT (a=1 OR b=1)", ("NOT", ("OR", "a", "b"))),
        ("((a=1))", "a"),
        ('x.y."z.w" = 1', "x.y.z.w"),
        ("ANDROID = 1 ORDER = 2 NOTE = 3", ("AND", "ANDROID", "ORDER", "NOTE")),
    ],
)
def test_precedence_and_grouping(text: str, expected: Any) -> None:
    assert shape(parse_filter(text)) == expected


def test_literals_keep_their_kind_and_decoded_text() -> None:
    node = parse_filter('a = "x\\"y\\u00e9\\n" b = \'q\' c = -1.5e3 d = eu-west-1 e:* f = true')
    assert isinstance(node, And)
    values = [
        (item.value.kind, item.value.text)
        for item in node.items
        if isinstance(item, Restriction) and item.value
    ]
    assert values == [
        ("string", 'x"yé\n'),
        ("string", "q"),
        ("number", "-1.5e3"),
        ("text", "eu-west-1"),
        ("any", "*"),
        ("text", "true"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "column", "token", "words"),
    [
        ("a = ", 5, "", "unexpected end of filter"),
        ('a = "abc', 5, '"', "unterminated string"),
        ("a = 10abc", 5, "1", "unexpected character"),
        ("a = 1 AND", 10, "", "unexpected end"),
        ("a = b)", 6, ")", "unexpected ')'"),
        ("NOT NOT a = 1", 5, "NOT", "unexpected 'NOT'"),
        ("a = AND", 5, "AND", "unexpected 'AND'"),
        ("a !== 1", 5, "=", "unexpected '='"),
        ("a = 1 # b", 7, "#", "unexpected character"),
        ('a = "\\q"', 5, '"\\q"', "unknown escape"),
        ("a(1)", 3, "1", "unexpected '1'"),
        ("a = b#", 6, "#", "unexpected character"),
        ("a = 1 ,", 7, ",", "unexpected"),
    ],
)
def test_syntax_errors_point_at_the_token(text: str, column: int, token: str, words: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    error = caught.value
    assert (error.column, error.token) == (column, token), error.message
    assert words in error.message and f"at column {column}" in error.message
    assert isinstance(error, InvalidArgument)
    assert error.field_violations == (("filter", error.message),)
    assert error.error_reason == "INVALID_FILTER"


def test_size_and_depth_are_bounded() -> None:
    with pytest.raises(FilterError, match="longer than"):
        parse_filter("a" * (MAX_FILTER_CHARS + 1))
    deep = "NOT (" * MAX_FILTER_DEPTH + "a = 1" + ")" * MAX_FILTER_DEPTH
    with pytest.raises(FilterError, match="nested more than"):
        parse_filter(deep)
    fine = "NOT (" * (MAX_FILTER_DEPTH - 1) + "a = 1" + ")" * (MAX_FILTER_DEPTH - 1)
    assert parse_filter(fine) is not None
    # A long flat filter is fine, and parentheses alone add no depth.
    assert parse_filter(" OR ".join(["a = 1"] * 300)) is not None
    assert parse_filter("(" * 500 + "a = 1" + ")" * 500) is not None


def test_payload_fields_from_a_json_schema() -> None:
    schema = {
        "$defs": {"money": {"type": "object", "properties": {"value": {"type": "number"}}}},
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "note": {"type": ["string", "null"]},
            "ratio": {"type": ["integer", "number"]},
            "status": {"enum": ["new", "paid"]},
            "flag": {"const": True},
            "price": {"$ref": "#/$defs/money"},
            "customer": {
                "type": "object",
                "properties": {
                    "tier": {"type": "string"},
                    "address": {"properties": {"city": {"type": "string"}}},
                },
            },
            "tags": {"type": "array", "items": {"type": "string"}},
            "lines": {"type": "array", "items": {"type": "object"}},
            "mixed": {"type": ["string", "number"]},
            "either": {"anyOf": [{"type": "string"}, {"type": "number"}]},
            "broken": {"$ref": "#/$defs/missing"},
        },
        "allOf": [{"properties": {"extra": {"type": "boolean"}}}],
    }
    assert payload_fields(schema) == {
        "id": "integer",
        "note": "string",
        "ratio": "number",
        "status": "string",
        "flag": "boolean",
        "price": "object",
        "price.value": "number",
        "customer": "object",
        "customer.tier": "string",
        "customer.address": "object",
        "customer.address.city": "string",
        "tags": "array",
        "tags[]": "string",
        "lines": "array",
        "extra": "boolean",
    }


def test_a_recursive_schema_ends() -> None:
    schema = {
        "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
        "$ref": "#/$defs/node",
    }
    fields = payload_fields(schema)
    assert "next" in fields and "next.next" in fields
    assert all(len(path) <= 1010 for path in fields)


def test_unknown_field_names_the_schema_and_what_it_declares() -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter("payload.amout > 10", SCOPE)
    assert caught.value.message == (
        'filter: unknown field "payload.amout" at column 9 (did you mean "payload.amount"? '
        'schema of "order.created" declares: amount, currency, customer, customer.name, '
        "customer.tier, paid, qty, tags)"
    )
    assert caught.value.token == "amout"


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("foo = 1", 1, 'unknown field "foo"'),
        ("key.x = 1", 5, 'key has no field "x"'),
        ("payload.customer.tiers = 1", 18, 'unknown field "payload.customer.tiers"'),
        ("payload.nope.deeper = 1", 9, 'unknown field "payload.nope.deeper"'),
        ("payload.customer:tir", 18, 'unknown field "payload.customer.tir"'),
        ("payload.paid > true", 14, "is a boolean; compare it with = or !="),
        ("payload.paid = yes", 16, "write true or false"),
        ("payload.currency = 10", 20, 'quote the value ("10")'),
        ('payload.amount = "10"', 18, "is not a number"),
        ("payload.amount = ten", 18, "is not a number"),
        ("payload.qty = 1.5", 15, "is an integer; 1.5 is not"),
        ("payload.amount:5", 15, "`:` takes only *"),
        ("payload.customer = 1", 1, "is an object; compare one of its fields"),
        ('payload.tags = "vip"', 1, "is an array; test an element"),
        ("payload.tags:5", 14, 'quote the value ("5")'),
        ("payload = 1", 1, "payload is an object"),
        ("payload.amount = *", 18, "* stands only after `:`"),
        ("payload.amount", 1, "needs a comparison"),
        ('"gold"', 1, "needs a comparison"),
        ("event_time > 2026", 14, "RFC 3339"),
        ('event_time > "2026-13-01T00:00:00Z"', 14, "is not an RFC 3339"),
        ('event_time > "2026-01-01"', 14, "is not an RFC 3339"),
        ("event_time:*", 11, "always set"),
        ("attributes = 1", 1, "attributes is a map"),
        ("attributes.a.b = 1", 14, "attributes are flat"),
        ("attributes.region = 5", 21, "quote the value"),
        ("attributes:5", 12, "attribute names are strings"),
        ("key = 5", 7, "quote the value"),
        ('payload.amount > 1e999999', 18, "is not a number"),
    ],
)  # fmt: skip
def test_type_errors_are_clear(text: str, column: int, words: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(text, SCOPE)
    assert words in caught.value.message, caught.value.message
    assert caught.value.column == column, caught.value.message


def test_scope_over_several_schemas() -> None:
    shipped = {"amount": "number", "carrier": "string"}
    refunds = {"amount": "integer", "carrier": "boolean"}
    scope = FieldScope({"order.created": ORDER, "order.shipped": shipped})  # type: ignore[dict-item]
    # declared by one schema of the scope is enough; its type must agree where declared twice
    assert compile_filter('payload.carrier = "dhl" payload.amount > 1', scope).params
    clash = FieldScope({"order.shipped": shipped, "refund": refunds})  # type: ignore[dict-item]
    assert compile_filter("payload.amount > 1.5", clash).params  # integer meets number
    with pytest.raises(FilterError) as caught:
        compile_filter("payload.carrier = true", clash)
    assert '"order.shipped": string, "refund": boolean' in caught.value.message
    with pytest.raises(FilterError, match=r'schemas of "order\.created", "order\.shipped" declare'):
        compile_filter("payload.nope = 1", scope)


def test_no_schema_in_scope() -> None:
    with pytest.raises(FilterError, match="no schema in scope declares payload fields"):
        compile_filter("payload.amount > 1", FieldScope())
    # envelope fields need no schema
    assert compile_filter('key = "k" type:"order.*"', FieldScope()).params == ("k", "order.")


def test_undeclared_fields_typed_by_the_literal() -> None:
    scope = FieldScope({"order.created": ORDER}, allow_undeclared=True)
    number = compile_filter("payload.weight > 2", scope)
    assert "::numeric" in number.sql
    boolean = compile_filter("payload.gift = true", scope)
    assert boolean.params == ('{"gift":true}',)
    text = compile_filter("payload.note = hello", scope)
    assert text.params == ('{"note":"hello"}',)
    # declared fields keep their declared type
    with pytest.raises(FilterError, match="quote the value"):
        compile_filter("payload.currency = 10", scope)


def test_values_are_never_in_the_sql_text() -> None:
    text = 'payload.customer.tier = "x\'y" OR attributes."a\'b" = "c\'d" OR key:"k\'*"'
    compiled = compile_filter(text, SCOPE)
    assert "'" not in compiled.sql.replace("'null'", "").replace("'string'", "")
    assert "x'y" not in compiled.sql and "a'b" not in compiled.sql
    assert compiled.sql.count("$") == len(compiled.params)


def test_a_schema_that_branches_recursively_ends_with_its_shallow_fields() -> None:
    # Each node names itself twice: 2**n paths of n levels, from a few lines of schema.
    node = {
        "type": "object",
        "properties": {
            "value": {"type": "number"},
            "left": {"$ref": "#/$defs/node"},
            "right": {"$ref": "#/$defs/node"},
        },
    }
    fields = payload_fields({"$defs": {"node": node}, "$ref": "#/$defs/node"})
    assert len(fields) <= MAX_PAYLOAD_FIELDS
    # Shallow fields first: every path of up to four levels is there, on either side.
    for path in ("value", "left", "right.value", "left.right.left.value", "right.right.right"):
        assert path in fields, path


def test_the_did_you_mean_hint_compares_a_bounded_number_of_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each comparison is quadratic in the names' lengths: a schema of MAX_PAYLOAD_FIELDS long,
    # alike names made one refused filter cost seconds of storage's CPU.
    import difflib

    compared: list[str] = []
    set_seq1 = difflib.SequenceMatcher.set_seq1

    def counting(self: difflib.SequenceMatcher[str], name: str) -> None:
        if name:  # once per declared field compared (the constructor sets "")
            compared.append(name)
        set_seq1(self, name)

    monkeypatch.setattr(difflib.SequenceMatcher, "set_seq1", counting)
    stem = "x" * 28
    fields: dict[str, Any] = {f"{stem}{i:04d}": "string" for i in range(MAX_PAYLOAD_FIELDS)}
    with pytest.raises(FilterError) as caught:
        compile_filter(f'payload.{stem}zzzz = "a"', FieldScope({"t": fields}))
    assert 'unknown field "payload.' in str(caught.value)
    assert len(compared) <= 100
    # The hint still works for an ordinary slip.
    with pytest.raises(FilterError) as caught:
        compile_filter("payload.amout = 1", FieldScope({"t": {"amount": "number"}}))
    assert 'did you mean "payload.amount"' in str(caught.value)
