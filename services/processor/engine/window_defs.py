"""Window definitions as data: defined in `streammesh.definitions.window_defs` (shared with
storage, which validates stored definitions with the same code) and re-exported here."""

from streammesh.definitions.window_defs import (
    AGGREGATE_FUNCTIONS,
    AggregateDef,
    WindowDef,
    WindowDefError,
    parse_duration,
    parse_window_def,
    parse_window_defs,
    window_starts,
)

__all__ = [
    "AGGREGATE_FUNCTIONS",
    "AggregateDef",
    "WindowDef",
    "WindowDefError",
    "parse_duration",
    "parse_window_def",
    "parse_window_defs",
    "window_starts",
]
