"""A payload that is parsed from JSON only when a window or rule first reads it.

Most events of a busy partition match no definition of their tenant and type; building each
event's payload dict anyway is the largest cost of decoding a batch. `LazyPayload` keeps the raw
bytes and parses them (orjson) on first access: an event nothing reads is never parsed. A payload
that is not a JSON object reads as `{}`, as `EngineEvent.payload` promises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

__all__ = ["LazyPayload"]

_EMPTY: dict[str, Any] = {}


class LazyPayload(Mapping[str, Any]):
    """A read-only mapping over a JSON object's bytes, parsed once on first access."""

    __slots__ = ("_parsed", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._parsed: dict[str, Any] | None = None

    def _object(self) -> dict[str, Any]:
        parsed = self._parsed
        if parsed is None:
            try:
                value = orjson.loads(self._raw) if self._raw else _EMPTY
            except orjson.JSONDecodeError:
                value = _EMPTY  # not JSON: no fields (the windows count it as lacking them)
            parsed = self._parsed = value if isinstance(value, dict) else _EMPTY
        return parsed

    @property
    def parsed(self) -> bool:
        """Whether a reader has needed the payload yet (for tests and metrics)."""
        return self._parsed is not None

    def get(self, key: str, default: Any = None) -> Any:
        # The accessors (events.compile_field_path) call get: one dict lookup after parsing.
        return self._object().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self._object()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._object())

    def __len__(self) -> int:
        return len(self._object())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._object() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a mapping: not hashable, as dict is

    def __repr__(self) -> str:
        return f"LazyPayload({self._object()!r})"
