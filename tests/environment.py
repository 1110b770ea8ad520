"""The tests' own environment: nothing a developer exported as STREAMMESH_* reaches them.

Settings classes read `STREAMMESH_*` variables, so an exported `STREAMMESH_AUTH_PORT` or
`STREAMMESH_DB_SCHEMA_PREFIX` (from a shell where the developer runs a stack) would change what a
test builds. Only the test suite's own inputs pass: `STREAMMESH_TEST_*` (which database and Redis
the tests use).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["KEPT_PREFIX", "PREFIX", "clean_environ", "foreign_settings"]

PREFIX = "STREAMMESH_"
KEPT_PREFIX = "STREAMMESH_TEST_"


def foreign_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """The STREAMMESH_* variable names in `environ` (default: os.environ) that tests must not
    see."""
    names = os.environ if environ is None else environ
    return sorted(n for n in names if n.startswith(PREFIX) and not n.startswith(KEPT_PREFIX))


def clean_environ() -> dict[str, str]:
    """A copy of os.environ without the STREAMMESH_* settings: the base of every environment a
    test gives a process it starts."""
    dropped = set(foreign_settings())
    return {name: value for name, value in os.environ.items() if name not in dropped}
