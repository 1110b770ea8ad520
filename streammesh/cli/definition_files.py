"""Rule and window files for `streammesh rule|window create|update`: JSON, or the YAML form the
docs show (docs/pattern-rules.md, docs/processor-windows.md), read into one JSON object here, so
that a typo is named with its line before anything is sent.

A file named *.json is read as JSON only; any other is read as JSON when it is JSON, else as
YAML (PyYAML's safe loader). One change to that loader: timestamps stay text. A rule's
`activation: 2026-12-01T12:00:00Z` goes to the service as written, for it to check (the plain
safe loader makes a datetime of it, which JSON cannot carry, and takes one without an offset as
naive, which the rule service rightly refuses as ambiguous).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import yaml

from streammesh.cli.schemas import SchemaFileError, read_text

__all__ = ["read_definition"]

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _TimesAsText(yaml.SafeLoader):
    """The safe loader without the implicit timestamp type (see the module docstring)."""


_TimesAsText.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_definition(path: str) -> str:
    """The rule or window in `path` ("-": stdin) as the text of one JSON object."""
    text = read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if path.endswith(".json"):
            raise SchemaFileError(
                f"{path} is not JSON: {error.msg} at line {error.lineno} column {error.colno}"
            ) from error
        document = _yaml(path, text)
    else:
        _check(document, path)
        return text
    _check(document, path)
    return json.dumps(document, ensure_ascii=False, allow_nan=False)


def _yaml(path: str, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_TimesAsText)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SchemaFileError(f"{path} is neither JSON nor YAML: {problem}{where}") from error


def _check(document: Any, path: str) -> None:
    if not isinstance(document, Mapping):
        raise SchemaFileError(f"{path} must hold one object (a rule or a window)")
    _json_ready(document, "")


def _json_ready(value: Any, where: str) -> None:
    """Refuse what YAML has and JSON lacks, naming its place: keys that are not strings
    (`yes:` is a boolean key in YAML 1.1), non-finite numbers, dates, binary, sets."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SchemaFileError(f"{where or 'the document'}: key {key!r} is not a string")
            _json_ready(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _json_ready(item, f"{where}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise SchemaFileError(f"{where}: {value} is not a JSON number")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise SchemaFileError(f"{where}: a {type(value).__name__} has no JSON form")
