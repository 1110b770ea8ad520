"""Event-time watermarks, one per stream partition, with idle advancement by processing time.

A partition's watermark is the largest event time seen on it minus a configured
out-of-orderness bound, and it never goes backwards: an event older than the watermark is late
(the windows decide what late means for them: allowed lateness, or the late-events output).

An idle partition must not hold windows open forever (the top complaint against Quix Streams,
quixio/quix-streams#790, where a window closes only when a newer message arrives). When a
partition has had no event for `idle_timeout_nanos` of processing time, its watermark advances
one-for-one with processing time from where it stood at the partition's last event. Processing
time is an input: the caller passes `now_nanos` (the engine never reads a clock), so a test or
a replay chooses it. The idle timer starts at the first `now_nanos` the clock sees after it is
built or restored, never from a time saved in a snapshot: a new owner that takes a partition
over after a failover (with a backlog to read) does not find it "idle" and push its watermark
past the backlog.

Windows close per partition. Ingest partitions by the event's key, so all events of one key
are in one partition and a key's windows close on that partition's watermark; a key that goes
quiet does not hold its windows open either, because any event of the partition (or idleness)
advances the watermark for every key in it. A processor owns several partitions, each with its
own clock and its own window state (both checkpointed per partition and handed over with the
partition's lease), so partitions never wait for one another. `combined_watermark` is the
minimum over the partitions a processor owns (idle ones included, advanced as above, and
partitions that never saw an event left out): it is the event time up to which everything this
processor owns is complete, for consumers that span partitions (a progress report, or results
grouped by a payload field, whose per-partition parts are complete once the combined watermark
of every owner passes the window's end).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["NO_WATERMARK", "ClockConfig", "PartitionClock", "combined_watermark"]

NO_WATERMARK = -(2**63)
"""The watermark of a partition that has not seen an event yet (before every event time)."""


@dataclass(frozen=True, slots=True)
class ClockConfig:
    """How watermarks follow event time and processing time."""

    out_of_orderness_nanos: int
    """How far behind the largest event time seen an event may be and still be on time."""
    idle_timeout_nanos: int
    """Processing time without events after which a partition's watermark advances by itself."""

    def __post_init__(self) -> None:
        if self.out_of_orderness_nanos < 0:
            raise ValueError("out_of_orderness_nanos: must be >= 0")
        if self.idle_timeout_nanos <= 0:
            raise ValueError("idle_timeout_nanos: must be > 0")


class PartitionClock:
    """The watermark of one partition. `observe` per event (in arrival order), `arrived` after a
    batch's events, `idle_advance` when a call brought no event for the partition."""

    __slots__ = (
        "_idle_timeout",
        "_last_event_now",
        "_out_of_orderness",
        "_watermark_at_last_event",
        "max_event_time",
        "watermark",
    )

    def __init__(self, config: ClockConfig, state: tuple[int, int] | None = None) -> None:
        self._out_of_orderness = config.out_of_orderness_nanos
        self._idle_timeout = config.idle_timeout_nanos
        self.max_event_time, self.watermark = state or (NO_WATERMARK, NO_WATERMARK)
        self._watermark_at_last_event = self.watermark
        self._last_event_now: int | None = None

    def observe(self, event_time_nanos: int) -> bool:
        """Account for one event; True when the watermark moved forward."""
        if event_time_nanos <= self.max_event_time:
            return False
        self.max_event_time = event_time_nanos
        candidate = event_time_nanos - self._out_of_orderness
        if candidate > self.watermark:
            self.watermark = candidate
            return True
        return False

    def arrived(self, now_nanos: int) -> None:
        """The partition had events at processing time `now_nanos`: restart the idle timer."""
        self._last_event_now = now_nanos
        self._watermark_at_last_event = self.watermark

    def idle_advance(self, now_nanos: int) -> bool:
        """Advance an idle partition's watermark with processing time; True when it moved."""
        if self._last_event_now is None:
            self.arrived(now_nanos)
            return False
        if self.max_event_time == NO_WATERMARK:
            return False
        idle_for = now_nanos - self._last_event_now - self._idle_timeout
        if idle_for <= 0:
            return False
        candidate = self._watermark_at_last_event + idle_for
        if candidate > self.watermark:
            self.watermark = candidate
            return True
        return False

    def snapshot(self) -> tuple[int, int]:
        """What a checkpoint keeps: the largest event time and the watermark (no processing time,
        see the module docstring)."""
        return (self.max_event_time, self.watermark)


def combined_watermark(clocks: Iterable[PartitionClock]) -> int:
    """The minimum watermark over partitions that saw events (NO_WATERMARK when none did)."""
    marks = [clock.watermark for clock in clocks if clock.max_event_time != NO_WATERMARK]
    return min(marks) if marks else NO_WATERMARK
