"""Write docs/configuration.md: every STREAMMESH_* setting, from the settings classes themselves.

Every pydantic-settings class with an env prefix in `streammesh` and `services` is found by
importing their modules (nothing is configured at import time, so that is safe), and each field
becomes one row: variable, type and limits, default, description. A class added later, or a field
added to one, appears on the next run without touching this script.

    .venv/bin/python scripts/gen_config_reference.py          # rewrite it (or: make docs)
    .venv/bin/python scripts/gen_config_reference.py --check  # exit 1 if it is stale

Either exits 1 naming any field without a description: add `Field(..., description=...)`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = ".venv/bin/python scripts/gen_config_reference.py"
PACKAGES = ("streammesh", "services")
SKIPPED = ("streammesh.api",)

__all__ = ["COMMAND", "OUTPUT", "Setting", "main", "render", "settings_classes", "variables"]


@dataclass(frozen=True)
class Setting:
    """One row of the reference."""

    variable: str
    type: str
    default: str
    description: str


def settings_classes() -> list[type[BaseSettings]]:
    """Every settings class with an env prefix, the CLI's first, then by prefix."""
    sys.path.insert(0, str(ROOT))
    found: dict[str, type[BaseSettings]] = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for module_info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            name = module_info.name
            # A __main__ module runs its service when imported.
            if name.startswith(SKIPPED) or name.rsplit(".", 1)[-1] == "__main__":
                continue
            module = importlib.import_module(name)
            for value in vars(module).values():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseSettings)
                    and value.__module__ == name
                    and value.model_config.get("env_prefix")
                ):
                    found[f"{name}.{value.__qualname__}"] = value
    return sorted(found.values(), key=lambda c: (_prefix(c) != "STREAMMESH_", _prefix(c)))


def _prefix(cls: type[BaseSettings]) -> str:
    return str(cls.model_config.get("env_prefix", ""))


def variables(cls: type[BaseSettings]) -> list[Setting]:
    """The rows of one class, in field order."""
    return [_setting(cls, name, field) for name, field in cls.model_fields.items()]


def _setting(cls: type[BaseSettings], name: str, field: FieldInfo) -> Setting:
    return Setting(
        variable=_env_name(cls, name, field),
        type=_type_text(field),
        default=_default_text(field) + _size_hint(name, field.default),
        description=_description(cls, name, field),
    )


def _env_name(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    alias = field.validation_alias or field.alias
    if isinstance(alias, str):
        return alias.upper()
    return f"{_prefix(cls)}{name}".upper()


def _description(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The field's description, or that of the same field in a base class (a subclass that only
    changes a default, such as each service's `port`, keeps the base's meaning)."""
    if field.description:
        return field.description
    for base in cls.__mro__[1:]:
        inherited = getattr(base, "model_fields", {}).get(name)
        if inherited is not None and inherited.description:
            return str(inherited.description)
    return ""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return " or ".join(_type_name(a) for a in args) + (" (optional)" if optional else "")
    if origin in (tuple, list, set, frozenset):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else "str"
        return f"list of {inner} (JSON)"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.MinLen, "min_length", "length ≥"),
    (annotated_types.MaxLen, "max_length", "length ≤"),
)


def _type_text(field: FieldInfo) -> str:
    limits = []
    for constraint in field.metadata:
        for kind, attribute, symbol in _BOUNDS:
            if isinstance(constraint, kind):
                limits.append(f"{symbol} {_number(getattr(constraint, attribute))}")
        pattern = getattr(constraint, "pattern", None)
        if isinstance(pattern, str):
            limits.append(f"matches `{pattern}`")
    text = _type_name(field.annotation)
    return f"{text}, {', '.join(limits)}" if limits else text


def _number(value: object) -> str:
    return str(value)


def _size_hint(name: str, value: object) -> str:
    """` (16 MiB)` after a byte count that is a whole number of KiB or MiB."""
    if not name.endswith("_bytes") or not isinstance(value, int) or value < 1024:
        return ""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value % size == 0:
            return f" ({value // size} {unit})"
    return ""


def _default_text(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        # A factory's value depends on the machine (home folder, host name): the description
        # says how it is computed, so the reference stays the same everywhere.
        return "computed" if field.default_factory is not None else "required"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple | list | set | frozenset):
        return f"`{json.dumps(list(value))}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{_number(value)}`"


_PLACEHOLDER = re.compile(r"(?<![`\w])([\w$./~-]*<[a-z_-]+>[\w$./~<>:-]*)")


def _cell(text: str) -> str:
    """One table cell: one line, pipes escaped, and words with <placeholders> in backticks
    (Markdown would take `<prefix>` for an HTML tag and hide it)."""
    flat = " ".join(text.split()).replace("|", "\\|")
    # Odd-numbered pieces are already code spans: leave them as they are.
    pieces = flat.split("`")
    return "`".join(
        piece if index % 2 else _PLACEHOLDER.sub(r"`\1`", piece)
        for index, piece in enumerate(pieces)
    )


def _service_env_variables() -> dict[str, list[str]]:
    """Per service, the variables `streammesh up` sets from the stack's own settings."""
    from streammesh.cli.stack import START_ORDER, StackConfig

    config = StackConfig.model_construct()
    return {name: sorted(config.service_env(name)) for name in START_ORDER}


HEADER = f"""\
# Configuration reference

<!-- Generated by scripts/gen_config_reference.py from the settings classes; do not edit.
     Regenerate with: {COMMAND} -->

Every setting is an environment variable (names are case-insensitive; lists are JSON, for
example `["analyst"]`). Each service reads its own `STREAMMESH_<SERVICE>_*` variables once at
start-up; the CLI reads the `STREAMMESH_*` variables of the first table. Bounds are checked at
start-up: a service with a setting out of range refuses to start and names it.

`streammesh up` gives each service the variables listed under its table, computed from the
CLI's settings (so `STREAMMESH_GATEWAY_PORT` moves the gateway and tells the CLI where it is).
Other service variables you export reach the services unchanged.
"""

FOOTER = """\
## Outside the settings classes

| variable | used by | meaning |
|---|---|---|
| `XDG_STATE_HOME` | the CLI, every service | the default state folder is `$XDG_STATE_HOME/streammesh` (else `~/.local/state/streammesh`) when `STREAMMESH_STATE_DIR` is unset |
| `STREAMMESH_TEST_DATABASE_URL` | the test suite | the database the tests use (default `postgresql+asyncpg://postgres@127.0.0.1:5432/streammesh_test`) |
| `STREAMMESH_TEST_REDIS_URL` | the test suite | the Redis the tests use (default `redis://127.0.0.1:6379/0`) |

The test suite ignores every other `STREAMMESH_*` variable you export: each test sets its own.
"""


def render() -> tuple[str, list[str]]:
    """The reference's text, and the variables that lack a description."""
    sections = [HEADER]
    undescribed: list[str] = []
    set_by_up = _service_env_variables()
    for cls in settings_classes():
        doc = (inspect.getdoc(cls) or "").split("\n\n", 1)[0]
        title = "CLI and stack" if _prefix(cls) == "STREAMMESH_" else _service_title(cls)
        lines = [
            f"## {title}",
            "",
            f"`{cls.__module__}.{cls.__qualname__}`, prefix `{_prefix(cls)}`."
            + (f" {_cell(doc)}" if doc else ""),
            "",
            "| variable | type | default | description |",
            "|---|---|---|---|",
        ]
        for setting in variables(cls):
            if not setting.description:
                undescribed.append(setting.variable)
            lines.append(
                f"| `{setting.variable}` | {_cell(setting.type)} | {_cell(setting.default)} | "
                f"{_cell(setting.description) or '**undocumented**'} |"
            )
        service = _service_title(cls)
        if service in set_by_up:
            names = ", ".join(f"`{name}`" for name in set_by_up[service])
            lines += ["", f"Set by `streammesh up`: {names}."]
        sections.append("\n".join(lines) + "\n")
    sections.append(FOOTER)
    return "\n".join(sections), undescribed


def _service_title(cls: type[BaseSettings]) -> str:
    return _prefix(cls).removeprefix("STREAMMESH_").rstrip("_").lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text, undescribed = render()
    status = 0
    if undescribed:
        print(
            "settings without a description (add Field(..., description=...)): "
            + ", ".join(undescribed),
            file=sys.stderr,
        )
        status = 1
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale; run: {COMMAND}", file=sys.stderr)
            return 1
        return status
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
