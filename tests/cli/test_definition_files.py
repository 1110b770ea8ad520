"""Rule and window files as `streammesh rule|window create` reads them: YAML (timestamps kept
as text), JSON, and every mistake named with its place before anything is sent."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streammesh.cli.definition_files import read_definition
from streammesh.cli.schemas import SchemaFileError
from streammesh.definitions.rules import parse_rule

RULE_YAML = """\
# three hot readings within a minute, per sensor
id: hot-sensor
kind: threshold
activation: 2026-12-01T12:00:00Z
match: {type: reading, where: [{field: payload.unit, op: eq, value: C}]}
field: payload.celsius
op: gt
value: 80.5
mode: level
count: 3
within: 1m
"""


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_yaml_rule_becomes_the_json_object_the_engine_parses(tmp_path: Path) -> None:
    document = json.loads(read_definition(_file(tmp_path, "hot.yaml", RULE_YAML)))
    assert document["activation"] == "2026-12-01T12:00:00Z"  # as written, not a datetime
    assert document["match"]["where"][0] == {"field": "payload.unit", "op": "eq", "value": "C"}
    assert (document["value"], document["count"], document["within"]) == (80.5, 3, "1m")
    rule = parse_rule({"tenant": "t", "version": 1, **document})
    noon = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert rule.activation_nanos == int(noon.timestamp()) * 10**9


def test_json_is_passed_on_as_written(tmp_path: Path) -> None:
    text = '{"id": "w", "kind": "tumbling"}\n'
    assert read_definition(_file(tmp_path, "w.json", text)) == text
    assert read_definition(_file(tmp_path, "w.yaml", text)) == text  # JSON is taken as JSON


def test_stdin_is_read_for_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("id: w\nkind: tumbling\n"))
    assert json.loads(read_definition("-")) == {"id": "w", "kind": "tumbling"}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "bad.json",
            '{"id": "w",\n "kind" "x"}',
            "bad.json is not JSON: Expecting ':' delimiter at line 2 column 9",
        ),
        ("bad.yaml", "id: w\nkind: [tumbling\nsize: 1s\n", "bad.yaml is neither JSON nor YAML:"),
        ("list.yaml", "- id: w\n", "list.yaml must hold one object (a rule or a window)"),
        ("key.yaml", "id: w\nmatch:\n  yes: 1\n", "match: key True is not a string"),
        ("inf.yaml", "id: w\nvalue: .inf\n", "value: inf is not a JSON number"),
        ("nan.json", '{"value": NaN}', "value: nan is not a JSON number"),
        ("bin.yaml", "id: w\nblob: !!binary aGk=\n", "blob: a bytes has no JSON form"),
        ("set.yaml", "steps:\n  - !!set {a: null}\n", "steps[0]: a set has no JSON form"),
    ],
)
def test_mistakes_are_named_with_their_place(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    with pytest.raises(SchemaFileError) as caught:
        read_definition(_file(tmp_path, name, text))
    assert message in str(caught.value)


def test_a_yaml_typo_names_its_line(tmp_path: Path) -> None:
    with pytest.raises(SchemaFileError) as caught:
        read_definition(_file(tmp_path, "bad.yaml", "id: w\nkind: tumbling\n  size: 1s\n"))
    assert "at line 3 column" in str(caught.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SchemaFileError) as caught:
        read_definition(str(tmp_path / "none.yaml"))
    assert str(caught.value).startswith(f"cannot read {tmp_path / 'none.yaml'}")
