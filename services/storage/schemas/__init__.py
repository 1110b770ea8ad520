"""The schema registry's logic, free of I/O: is a document a valid Draft 2020-12 schema
(`metaschema`), and is a new version compatible with the ones before it (`compatibility`)."""

from services.storage.schemas.compatibility import (
    DEFAULT_MODE,
    CompatibilityMode,
    CompatibilityReport,
    CompatibilityViolation,
    Direction,
    PreviousVersion,
    check_compatibility,
)
from services.storage.schemas.metaschema import DRAFT_2020_12, SchemaProblem, schema_problems

__all__ = [
    "DEFAULT_MODE",
    "DRAFT_2020_12",
    "CompatibilityMode",
    "CompatibilityReport",
    "CompatibilityViolation",
    "Direction",
    "PreviousVersion",
    "SchemaProblem",
    "check_compatibility",
    "schema_problems",
]
