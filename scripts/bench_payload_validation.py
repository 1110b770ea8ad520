"""What validating one ~100-byte JSON event against a 5-property schema costs, in us per event,
JSON parse included, for each Python JSON Schema validator (the choice for ingest, issue 9).

    .venv/bin/python scripts/bench_payload_validation.py [--events 20000] [--rounds 7]

Printed per candidate: a valid and an invalid event, through the candidate's fastest yes/no call
and through the call that lists errors (what ingest needs for a refused event). Best of
--rounds of process CPU time, so a busy machine inflates the figures less; compare figures of
one run only.
Candidates that lack Draft 2020-12 are run on the draft-07 twin of the schema, for reference,
and marked so. jschon is measured when installed (it is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import fastjsonschema
import jsonschema
import jsonschema_rs
import orjson

from services.ingest.payload_schema import PayloadValidator

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "minLength": 1, "maxLength": 64},
        "amount": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "quantity": {"type": "integer", "minimum": 1},
        "express": {"type": "boolean"},
    },
    "required": ["order_id", "amount", "currency", "quantity"],
    "additionalProperties": False,
}
DRAFT7_SCHEMA = {**SCHEMA, "$schema": "http://json-schema.org/draft-07/schema#"}
VALID = b'{"order_id":"ord-0001234567","amount":42.5,"currency":"EUR","quantity":3,"express":false}'
INVALID = b'{"order_id":"ord-0001234567","amount":-1,"currency":"XXX","quantity":3,"express":false}'

Case = Callable[[bytes], object]


def _best(rounds: int, events: int, run: Case, payload: bytes) -> float:
    best = float("inf")
    for _ in range(rounds):
        # CPU time of this process: on a shared machine, time spent waiting for a core is not
        # the validator's cost.
        started = time.process_time()
        for _ in range(events):
            run(payload)
        best = min(best, (time.process_time() - started) / events)
    return best * 1e6


def _candidates() -> list[tuple[str, str, Case, Case]]:
    """(name, drafts note, yes/no call, error-listing call), each taking the raw bytes."""
    reference = jsonschema.Draft202012Validator(SCHEMA)
    rust = jsonschema_rs.Draft202012Validator(SCHEMA, validate_formats=True)
    fast = fastjsonschema.compile(DRAFT7_SCHEMA)
    wrapper = PayloadValidator(SCHEMA)

    def fast_check(payload: bytes) -> bool:
        try:
            fast(orjson.loads(payload))
        except fastjsonschema.JsonSchemaValueException:
            return False
        return True

    found: list[tuple[str, str, Case, Case]] = [
        (
            f"{validator_name} + {parse.__module__}.loads",
            "2020-12",
            lambda p, v=validator, parse=parse: v.is_valid(parse(p)),
            lambda p, v=validator, parse=parse: list(v.iter_errors(parse(p))),
        )
        for validator_name, validator, parsers in (
            ("jsonschema", reference, (json.loads,)),
            ("jsonschema-rs", rust, (json.loads, orjson.loads)),
        )
        for parse in parsers
    ]
    found += [
        (
            "ingest PayloadValidator (jsonschema-rs + orjson)",
            "2020-12",
            wrapper.errors,
            wrapper.errors,
        ),
        (
            "fastjsonschema + orjson",
            "draft-04/06/07 only: NOT 2020-12 (run on the draft-07 twin)",
            fast_check,
            fast_check,  # it raises at the first error: no list to be had
        ),
    ]
    try:
        from jschon import JSON, URI, JSONSchema, create_catalog
    except ImportError:
        print("jschon: not installed, skipped (pip install jschon to include it)")
    else:
        create_catalog("2020-12")
        compiled = JSONSchema(SCHEMA, metaschema_uri=URI(SCHEMA["$schema"]))
        found.append(
            (
                "jschon",
                "2020-12",
                lambda p: compiled.evaluate(JSON.loads(p)).valid,
                lambda p: compiled.evaluate(JSON.loads(p)).output("basic"),
            )
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"event: {len(VALID)} bytes valid, {len(INVALID)} bytes invalid; schema: 5 properties")
    print(f"json.loads alone: {_best(args.rounds, args.events, json.loads, VALID):.2f} us")
    print(f"orjson.loads alone: {_best(args.rounds, args.events, orjson.loads, VALID):.2f} us")
    header = f"{'candidate':<50} {'valid':>8} {'invalid':>8} {'errors':>8}  drafts"
    print(header)
    print("-" * len(header))
    for name, drafts, check, list_errors in _candidates():
        # The slow pure-Python candidates get fewer events: the figure is per event anyway.
        events = args.events if "jsonschema-rs" in name or "Payload" in name else args.events // 10
        valid = _best(args.rounds, events, check, VALID)
        invalid = _best(args.rounds, events, check, INVALID)
        errors = _best(args.rounds, events, list_errors, INVALID)
        print(f"{name:<50} {valid:8.2f} {invalid:8.2f} {errors:8.2f}  {drafts}")
    print("CPU us per event, best of rounds; 'errors' = listing every error of the invalid event")


if __name__ == "__main__":
    main()
