"""The payload validator ingest runs per event: compiled once per schema version, bytes in,
every reason out (JSON Pointer into the payload and a message), [] for a valid payload."""

from __future__ import annotations

import pytest

from services.ingest.payload_schema import PayloadError, PayloadValidator, SchemaNotCompiled

ORDER = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "minLength": 1},
        "amount": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD"]},
        "lines": {
            "type": "array",
            "prefixItems": [{"type": "string"}],
            "items": {"type": "integer"},
        },
        "placed": {"type": "string", "format": "date-time"},
        "a/b": {"type": "integer"},
    },
    "required": ["order_id", "amount"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def validator() -> PayloadValidator:
    return PayloadValidator(ORDER)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"order_id":"o-1","amount":42.5}',
        b'{"order_id":"o-1","amount":0,"currency":"EUR","lines":["sku",1,2]}',
        b'{"order_id":"o-1","amount":1,"placed":"2026-12-01T12:00:00Z"}',
        # Beyond 64 bits: valid JSON that orjson alone would refuse.
        b'{"order_id":"o-1","amount":123456789012345678901234567890}',
    ],
)
def test_valid_payloads_have_no_errors(validator: PayloadValidator, payload: bytes) -> None:
    assert validator.errors(payload) == []


def test_every_error_is_listed_with_its_instance_path(validator: PayloadValidator) -> None:
    errors = validator.errors(
        b'{"order_id":"","amount":-1,"currency":"JPY","lines":["sku","x"],"a/b":"s"}'
    )
    paths = [error.instance_path for error in errors]
    assert sorted(paths) == sorted(["/a~1b", "/amount", "/currency", "/lines/1", "/order_id"])
    by_path = {error.instance_path: error.message for error in errors}
    assert "minimum" in by_path["/amount"]
    assert "JPY" in by_path["/currency"]


def test_missing_and_unexpected_properties_name_them(validator: PayloadValidator) -> None:
    errors = validator.errors(b'{"amount":1,"extra":true}')
    messages = " | ".join(error.message for error in errors)
    assert {error.instance_path for error in errors} == {""}
    assert "order_id" in messages and "extra" in messages


def test_formats_are_asserted(validator: PayloadValidator) -> None:
    errors = validator.errors(b'{"order_id":"o","amount":1,"placed":"yesterday"}')
    assert [error.instance_path for error in errors] == ["/placed"]


@pytest.mark.parametrize(
    "payload", [b'{"order_id":', b"\xff\xfe", b'{"order_id":"o","amount":NaN}', b""]
)
def test_payloads_that_are_not_json_say_so(validator: PayloadValidator, payload: bytes) -> None:
    [error] = validator.errors(payload)
    assert error.instance_path == ""
    assert error.message.startswith("the payload is not valid JSON")


def test_the_error_count_is_capped() -> None:
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(30)}}
    payload = "{" + ",".join(f'"p{i}":"x"' for i in range(30)) + "}"
    errors = PayloadValidator(many, max_errors=5).errors(payload.encode())
    assert len(errors) == 5
    assert all(isinstance(error, PayloadError) for error in errors)


def test_long_messages_are_cut() -> None:
    errors = PayloadValidator({"type": "string"}).errors(b"[" + b'"abcdefghij",' * 50 + b"1]")
    assert len(errors[0].message) <= 203


@pytest.mark.parametrize(
    "schema", [{"pattern": "(?<=x"}, {"$ref": "#/$defs/missing"}, {"type": "strin"}]
)
def test_a_schema_that_does_not_compile_is_refused_at_compile_time(schema: object) -> None:
    with pytest.raises(SchemaNotCompiled):
        PayloadValidator(schema)  # type: ignore[arg-type]
