"""`make test` in a shell that exported a stack's STREAMMESH_* settings still passes: tests set
their own environment (tests/environment.py).

A pytest run in a subprocess gets a hostile value for every setting of every settings class
(ports, prefixes, state folder, schema names, URLs, limits, log level...), then runs tests that
build settings, start servers and a whole stack.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import typing
from pathlib import Path
from types import ModuleType

import pytest

from tests.environment import KEPT_PREFIX, clean_environ, foreign_settings

ROOT = Path(__file__).resolve().parent.parent
SUBSET = [
    "tests/auth/test_startup.py",
    "tests/storage/test_migrations_and_outage.py",
    "tests/cli/test_broken_pipe.py",
    "tests/e2e/test_stack.py::test_published_event_is_stored_exactly_once_and_queryable",
]


def reference_module() -> ModuleType:
    """scripts/gen_config_reference.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", ROOT / "scripts" / "gen_config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _hostile(annotation: object, default: object) -> str:
    """A value that breaks whatever reads it: wrong ports, foreign names, flipped switches."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if args and typing.get_origin(annotation) is not tuple else annotation
    if kind is bool:
        return "false" if default is True else "true"
    if kind is int:
        return "1"
    if kind is float:
        return "0.25"
    if kind is Path:
        return "/nonexistent/hostile"
    if typing.get_origin(kind) is tuple:
        return '["admin"]'
    return "hostile"


def hostile_environ() -> dict[str, str]:
    """Every STREAMMESH_* setting set to a hostile value, plus the tests' own inputs."""
    reference = reference_module()
    hostile: dict[str, str] = {}
    for cls in reference.settings_classes():
        for setting, field in zip(reference.variables(cls), cls.model_fields.values(), strict=True):
            hostile[setting.variable] = _hostile(field.annotation, field.default)
    hostile |= {
        "STREAMMESH_HOST": "203.0.113.1",
        "STREAMMESH_DATABASE_URL": "postgresql+asyncpg://hostile@127.0.0.1:1/hostile",
        "STREAMMESH_REDIS_URL": "redis://127.0.0.1:1/0",
        "STREAMMESH_DB_SCHEMA_PREFIX": "hostile_",
        "STREAMMESH_STREAM_PREFIX": "hostile:events",
        "STREAMMESH_AUTH_REDIS_PREFIX": "hostile:auth:",
    }
    assert not any(name.startswith(KEPT_PREFIX) for name in hostile)
    return clean_environ() | hostile


def test_hostile_values_cover_every_setting() -> None:
    environ = hostile_environ()
    assert {
        "STREAMMESH_STATE_DIR",
        "STREAMMESH_GATEWAY_PORT",
        "STREAMMESH_AUTH_DB_SCHEMA",
        "STREAMMESH_STORAGE_DB_SCHEMA",
        "STREAMMESH_AUTH_SECRET_KEY_FILE",
        "STREAMMESH_INGEST_PARTITIONS",
        "STREAMMESH_PROCESSOR_LEASE_TTL_MS",
    } <= set(foreign_settings(environ))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_suite_passes_with_hostile_exported_settings(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'inner'}",
            *SUBSET,
        ],
        cwd=ROOT,
        env=hostile_environ(),
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
