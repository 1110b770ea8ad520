"""Validating event payloads against a registered JSON Schema (Draft 2020-12) at ingest.

One `PayloadValidator` per schema version, compiled once (the ingest cache keeps them by
(tenant, type, version)); `errors(payload)` parses the bytes and returns what is wrong, empty
when the payload is valid. jsonschema-rs with orjson was chosen by measurement
(scripts/bench_payload_validation.py): about 1 us per 100-byte event, parse included, where
`jsonschema` costs tens and fastjsonschema lacks Draft 2020-12. Formats are asserted, as the
registry's compatibility check assumes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import jsonschema_rs
import orjson

__all__ = ["PayloadError", "PayloadValidator", "SchemaNotCompiled"]

_MAX_MESSAGE = 200


class SchemaNotCompiled(Exception):
    """The schema cannot be compiled by the validator (the registry refuses such schemas, so
    meeting one here means a stored version is broken, not that the client erred)."""


@dataclass(frozen=True)
class PayloadError:
    """One reason a payload is refused."""

    instance_path: str
    """JSON Pointer into the payload ("" for the whole payload)."""
    message: str


def _pointer(parts: Any) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_slowly(payload: bytes, first: orjson.JSONDecodeError) -> tuple[Any, PayloadError | None]:
    """orjson refuses integers beyond 64 bits, which JSON allows: those (rare) payloads get the
    standard parser; NaN and Infinity stay refused, as RFC 8259 says."""
    try:
        return json.loads(payload, parse_constant=_refuse_constant), None
    except (ValueError, UnicodeDecodeError):
        return None, PayloadError("", f"the payload is not valid JSON: {first}")


class PayloadValidator:
    """A compiled schema version. Thread-safe and reusable; costs one compile."""

    def __init__(self, schema: Mapping[str, Any] | bool, *, max_errors: int = 10) -> None:
        try:
            self._validator = jsonschema_rs.Draft202012Validator(
                dict(schema) if isinstance(schema, Mapping) else schema, validate_formats=True
            )
        except (ValueError, jsonschema_rs.ReferencingError) as error:
            raise SchemaNotCompiled(str(error)) from error
        self._max_errors = max_errors

    def errors(self, payload: bytes) -> list[PayloadError]:
        """What is wrong with `payload` (at most `max_errors` reasons); [] when it is valid."""
        try:
            instance = orjson.loads(payload)
        except orjson.JSONDecodeError as refusal:
            instance, parse_error = _parse_slowly(payload, refusal)
            if parse_error is not None:
                return [parse_error]
        # is_valid stops at the first failure and builds no error objects: the common, valid
        # case stays on the fast path (this method is on ingest's per-event path).
        if self._validator.is_valid(instance):
            return []
        found = []
        for failure in islice(self._validator.iter_errors(instance), self._max_errors):
            message = failure.message
            if len(message) > _MAX_MESSAGE:
                message = message[:_MAX_MESSAGE] + "..."
            found.append(PayloadError(_pointer(failure.instance_path), message))
        return found
