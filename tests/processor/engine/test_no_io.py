"""The engine stays pure logic: none of its modules imports I/O, at any depth of its own imports."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import services.processor.engine as engine
import streammesh.definitions as definitions

# Anything that reaches a network, a disk, a process or an event loop.
FORBIDDEN_ROOTS = {
    "asyncio",
    "asyncpg",
    "grpc",
    "redis",
    "socket",
    "ssl",
    "subprocess",
    "threading",
    "multiprocessing",
    "os",
    "shutil",
    "tempfile",
    "pathlib",
    "io",
    "selectors",
    "urllib",
    "http",
    "logging",
    "time",
    "services",
    "streammesh",
}
ENGINE_PACKAGE = "services.processor.engine"
# The one shared module the engine may import: the pure definition model (rules, windows, field
# paths), moved to streammesh so storage validates definitions with the engine's own parser
# without importing the processor. It is held to the same no-I/O rule below.
SHARED_PACKAGE = "streammesh.definitions"


def _engine_modules() -> list[Path]:
    roots = (Path(engine.__file__).parent, Path(definitions.__file__).parent)
    return sorted(path for root in roots for path in root.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_engine_imports_no_io() -> None:
    offending = {
        f"{path.name}: {name}"
        for path in _engine_modules()
        for name in _imports(path)
        if name.split(".")[0] in FORBIDDEN_ROOTS
        and not name.startswith((ENGINE_PACKAGE, SHARED_PACKAGE))
    }
    assert not offending, f"engine modules import I/O (or other services): {sorted(offending)}"


def test_the_check_sees_every_engine_module() -> None:
    listed = {
        module.name for module in pkgutil.walk_packages(engine.__path__, ENGINE_PACKAGE + ".")
    }
    assert f"{ENGINE_PACKAGE}.events" in listed
    assert len(_engine_modules()) >= 2
