"""The processor's parts stay apart: the source (queue side) and delivery (storage side) meet only
in worker.py, and neither reaches up into the wiring. The engine's own rule (no I/O, nothing but
streammesh.definitions) is tests/processor/engine/test_no_io.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import services.processor as processor

ROOT = Path(processor.__file__).parent
PACKAGE = "services.processor"
WIRING = [f"{PACKAGE}.{name}" for name in ("worker", "server", "service", "__main__")]

FORBIDDEN = {
    "source": [f"{PACKAGE}.delivery", f"{PACKAGE}.engine", *WIRING],
    "delivery": [f"{PACKAGE}.source", *WIRING],
    # The engine's side sits between the two (it acknowledges through the source's fence
    # after delivery stored), and is wired like them.
    "processing": WIRING,
}
"""Per part, the packages and modules none of its modules may import (at any nesting)."""


def _package_of(path: Path) -> str:
    """The package a module file's relative imports start from."""
    parts = path.relative_to(ROOT.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1])


def _imports(text: str, package: str) -> set[str]:
    """Every module the code imports, relative imports resolved against `package`, and
    `from x import y` as both x and x.y (y may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_a_part_imports_none_of_the_parts_it_must_not_know(part: str) -> None:
    modules = sorted((ROOT / part).rglob("*.py"))
    assert len(modules) >= 3, f"expected the modules of {part}/"
    offending = sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for path in modules
        for name in _imports(path.read_text(), _package_of(path))
        if any(_within(name, target) for target in FORBIDDEN[part])
    )
    assert not offending, f"{part}/ imports what it must not: {offending}"


def test_the_check_catches_relative_absolute_and_nested_imports() -> None:
    code = (
        "from ..delivery import dead_letters\n"
        "import services.processor.delivery.store\n"
        "def later() -> None:\n"
        "    from services.processor import worker\n"
    )
    names = _imports(code, f"{PACKAGE}.source")
    assert f"{PACKAGE}.delivery.dead_letters" in names
    assert f"{PACKAGE}.delivery.store" in names
    assert f"{PACKAGE}.worker" in names
