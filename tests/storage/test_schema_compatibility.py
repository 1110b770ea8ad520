"""The compatibility check against the table of changes (tests/storage/compatibility_table.py).

Two independent sides: `test_verdicts_*` ask the checker; `test_semantics_*` ask only a real
validator (jsonschema) whether the table's verdicts hold: a witness for each break, and no
instance generated from the writer's schema that the reader refuses where the table says
compatible. Neither side reads the other's output.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.storage.schemas import (
    CompatibilityMode,
    PreviousVersion,
    check_compatibility,
)
from tests.storage.compatibility_table import CHAINS, CHANGES, UNPROVABLE, Breaks, Chain, Change
from tests.storage.schema_witnesses import (
    generate,
    property_names,
    reader_validator,
    writer_validator,
)

MODES = list(CompatibilityMode)


def expected_verdicts(change: Change) -> dict[CompatibilityMode, bool]:
    """From the table's two directions, by the definitions of the modes (one previous version,
    so a transitive mode compares with the same single version as its plain one)."""
    backward = change.backward is None
    forward = change.forward is None
    return {
        CompatibilityMode.NONE: True,
        CompatibilityMode.BACKWARD: backward,
        CompatibilityMode.BACKWARD_TRANSITIVE: backward,
        CompatibilityMode.FORWARD: forward,
        CompatibilityMode.FORWARD_TRANSITIVE: forward,
        CompatibilityMode.FULL: backward and forward,
        CompatibilityMode.FULL_TRANSITIVE: backward and forward,
    }


def test_the_table_is_big_enough() -> None:
    assert len(CHANGES) >= 30
    assert len({change.name for change in CHANGES}) == len(CHANGES)


@pytest.mark.parametrize("change", CHANGES, ids=lambda change: change.name)
def test_verdicts_per_mode(change: Change) -> None:
    expected = expected_verdicts(change)
    got = {
        mode: check_compatibility(change.new, [PreviousVersion(1, change.old)], mode).compatible
        for mode in MODES
    }
    assert got == expected, change.why


@pytest.mark.parametrize("change", CHANGES, ids=lambda change: change.name)
def test_violations_name_the_rule_and_paths(change: Change) -> None:
    report = check_compatibility(
        change.new, [PreviousVersion(1, change.old)], CompatibilityMode.FULL
    )
    for direction, verdict in (("BACKWARD", change.backward), ("FORWARD", change.forward)):
        found = [v for v in report.violations if v.direction == direction]
        if verdict is None:
            assert found == []
            continue
        assert verdict.rule in {v.rule for v in found}, [(v.rule, v.message) for v in found]
        for violation in found:
            assert violation.version == 1
            assert violation.message.startswith(f"{direction} against version 1")
            for pointer in (
                violation.instance_path,
                violation.new_schema_path,
                violation.old_schema_path,
            ):
                assert pointer == "" or pointer.startswith("/")


def _writer_and_reader(change: Change, direction: str) -> tuple[Any, Any]:
    return (change.old, change.new) if direction == "BACKWARD" else (change.new, change.old)


@pytest.mark.parametrize("change", CHANGES, ids=lambda change: change.name)
@pytest.mark.parametrize("direction", ["BACKWARD", "FORWARD"])
def test_semantics_agree_with_the_table(change: Change, direction: str) -> None:
    """A real validator, not the checker: the witness of a break is written by the writer and
    refused by the reader; where the table says compatible, no generated instance of the
    writer is refused by the reader."""
    writer, reader = _writer_and_reader(change, direction)
    verdict = change.backward if direction == "BACKWARD" else change.forward
    writes = writer_validator(writer)
    reads = reader_validator(reader)
    if isinstance(verdict, Breaks):
        assert writes.is_valid(verdict.witness), "the witness is not something writers write"
        assert not reads.is_valid(verdict.witness), "the reader accepts the witness"
        return
    samples = generate(writer, count=600, names=property_names(writer, reader))
    # At least two distinct instances (the smallest writer language in the table has two).
    assert len(samples) >= 2, f"too few writer instances generated to mean anything: {samples}"
    refused = [sample for sample in samples if not reads.is_valid(sample)]
    assert refused == [], change.why


BREAKS = [
    (change, direction)
    for change in CHANGES
    for direction, verdict in (("BACKWARD", change.backward), ("FORWARD", change.forward))
    if verdict is not None
]


@pytest.mark.parametrize(("change", "direction"), BREAKS, ids=[f"{d}-{c.name}" for c, d in BREAKS])
def test_the_generator_finds_every_break_by_itself(change: Change, direction: str) -> None:
    """The oracle has teeth: where the table says a direction breaks, the same generator that
    backs the compatible rows finds a refused instance without being shown the witness."""
    writer, reader = _writer_and_reader(change, direction)
    reads = reader_validator(reader)
    samples = generate(writer, count=600, names=property_names(writer, reader))
    assert any(not reads.is_valid(sample) for sample in samples)


@pytest.mark.parametrize("chain", CHAINS, ids=lambda chain: chain.name)
def test_chain_verdicts_per_mode(chain: Chain) -> None:
    *older, newest = chain.versions
    previous = [PreviousVersion(index + 1, schema) for index, schema in enumerate(older)]
    got = {mode.value: check_compatibility(newest, previous, mode).compatible for mode in MODES}
    assert got == chain.expected, chain.why
    transitive = check_compatibility(newest, previous, CompatibilityMode.FULL_TRANSITIVE)
    assert transitive.checked_versions == tuple(range(len(older), 0, -1))
    broken = {(v.version, v.direction.value) for v in transitive.violations}
    assert broken == set(chain.witnesses)


@pytest.mark.parametrize("chain", CHAINS, ids=lambda chain: chain.name)
def test_chain_witnesses(chain: Chain) -> None:
    newest = chain.versions[-1]
    for (version, direction), witness in chain.witnesses.items():
        old = chain.versions[version - 1]
        writer, reader = (old, newest) if direction == "BACKWARD" else (newest, old)
        assert writer_validator(writer).is_valid(witness)
        assert not reader_validator(reader).is_valid(witness)


@pytest.mark.parametrize("case", UNPROVABLE, ids=lambda case: case.name)
def test_unanalysed_constructs_are_reported_not_guessed(case: Any) -> None:
    report = check_compatibility(case.new, [PreviousVersion(1, case.old)], CompatibilityMode.FULL)
    rules = {v.rule for v in report.violations if v.direction == case.direction}
    assert "unsupported-construct" in rules, case.why
    assert not report.compatible


def test_every_violation_is_listed_not_just_the_first() -> None:
    old = {"type": "object", "properties": {"a": {"type": "string"}, "n": {"type": "number"}}}
    new = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "n": {"type": "integer"}},
        "required": ["a", "z"],
    }
    report = check_compatibility(new, [PreviousVersion(3, old)])
    assert report.mode is CompatibilityMode.BACKWARD
    found = {(v.rule, v.instance_path, v.new_schema_path) for v in report.violations}
    assert found == {
        ("required-added", "/a", "/required"),
        ("required-added", "/z", "/required"),
        ("type-refused", "/a", "/properties/a/type"),
        ("type-narrowed", "/n", "/properties/n/type"),
    }


def test_the_first_version_and_mode_none_check_nothing() -> None:
    schema = {"type": "object"}
    assert check_compatibility(schema, []).compatible
    report = check_compatibility(True, [PreviousVersion(1, schema)], CompatibilityMode.NONE)
    assert report.compatible and report.checked_versions == ()


def test_plain_modes_compare_with_the_latest_version_only() -> None:
    # Versions may come in any order; "latest" is the highest number.
    versions = [
        PreviousVersion(2, {"type": "integer"}),
        PreviousVersion(1, {"type": "string"}),
    ]
    report = check_compatibility({"type": "integer"}, versions, CompatibilityMode.FULL)
    assert report.compatible and report.checked_versions == (2,)


def _table_schemas() -> list[Any]:
    distinct: dict[str, Any] = {}
    for change in CHANGES:
        for schema in (change.old, change.new):
            distinct[json.dumps(schema, sort_keys=True)] = schema
    for chain in CHAINS:
        for schema in chain.versions:
            distinct[json.dumps(schema, sort_keys=True)] = schema
    return list(distinct.values())


def test_every_compatible_verdict_between_any_two_table_schemas_is_sound() -> None:
    """Beyond the rows: for every ordered pair of schemas in the table (some 4000), where the
    checker finds nothing, no generated instance of the writer is refused by the reader."""
    schemas = _table_schemas()
    names = property_names(*schemas)
    samples = [generate(schema, count=300, names=names) for schema in schemas]
    proven = 0
    for index, writer in enumerate(schemas):
        for reader in schemas:
            report = check_compatibility(reader, [PreviousVersion(1, writer)])
            if not report.compatible:
                continue
            proven += 1
            reads = reader_validator(reader)
            refused = [sample for sample in samples[index] if not reads.is_valid(sample)]
            assert refused == [], (writer, reader, refused[:3])
    assert proven > len(schemas)  # more than the trivial pairs of a schema with itself
