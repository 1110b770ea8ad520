"""What the window engine hands back: window results, late events, and the watermarks.

Results and late events are named tuples: immutable like a frozen dataclass, and built about
three times faster, which counts when a window emits every few events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["LATE_BEYOND_ALLOWED_LATENESS", "LateEvent", "WindowOutputs", "WindowResult"]

LATE_BEYOND_ALLOWED_LATENESS = "window closed beyond allowed lateness"


class WindowResult(NamedTuple):
    """One emission of one window of one group.

    Revision 0 is the final result, emitted once when the partition's watermark passes the
    window's end; each event accepted later (within the allowed lateness) emits the window
    again with the next revision. A session window whose bounds change after it was emitted
    (a late event extended it or merged it with another) is emitted once more with
    `retracted=True` under its old bounds; the session under its new bounds is a new window
    (its own revision 0). `identity` is unique per emission and identical when a replay emits
    it again, so storage writes each result exactly once (ON CONFLICT DO NOTHING on it).
    `WindowEngine.current` returns live views of open windows with revision -1 (never stored).
    The
    partition is part of it: with a group-by on a payload field, one group can have events in
    several partitions, each emitting its part (merge them on read).
    """

    tenant: str
    window_id: str
    window_version: int
    partition: int
    group: str
    start_nanos: int
    end_nanos: int
    revision: int
    values: Mapping[str, float | int | None]
    """Aggregate name -> value (None when no event had a number in the field)."""
    watermark_nanos: int
    """The partition's watermark when the result was emitted."""
    retracted: bool = False

    @property
    def identity(self) -> tuple[str, str, int, int, str, int, int, int]:
        return (
            self.tenant,
            self.window_id,
            self.window_version,
            self.partition,
            self.group,
            self.start_nanos,
            self.end_nanos,
            self.revision,
        )


class LateEvent(NamedTuple):
    """An event that missed a window: it arrived when the partition's watermark had passed the
    window's end plus the allowed lateness. One record per (event, definition, missed window);
    a hopping window's event may still count in its later windows. For a session window the
    bounds are those of the session the event would have opened: [time, time + gap)."""

    tenant: str
    window_id: str
    window_version: int
    partition: int
    event_id: str
    event_key: str
    group: str
    event_time_nanos: int
    watermark_nanos: int
    window_start_nanos: int
    window_end_nanos: int
    reason: str = LATE_BEYOND_ALLOWED_LATENESS

    @property
    def identity(self) -> tuple[str, str, int, str, int]:
        return (
            self.tenant,
            self.window_id,
            self.window_version,
            self.event_id,
            self.window_start_nanos,
        )


@dataclass(slots=True)
class WindowOutputs:
    """The outputs of one engine call, in emission order, and the watermark of every partition
    the call touched (for the pattern rules and for the checkpoint)."""

    results: list[WindowResult] = field(default_factory=list)
    late: list[LateEvent] = field(default_factory=list)
    watermarks: dict[int, int] = field(default_factory=dict)
    ungrouped: int = 0
    """Events of a window's tenant and type that lacked its group-by field (not counted)."""
