"""The engine of one stream partition: its watermark, the windows and the pattern rules of every
tenant's active definitions, what they emit, and the whole state as one versioned snapshot.

How the worker drives it (one per owned partition; every call synchronous and pure):

    engine = PartitionEngine(partition, clock, windows, rules)       # or, on takeover:
    engine = PartitionEngine.restore(checkpoint.snapshot, clock, windows, rules)
    skip the entries with entry_id_key(id) <= entry_id_key(engine.last_entry_id)
    out = engine.process(events, now_nanos, last_entry_id=...)        # events in stream order
    out = engine.process([], now_nanos)                               # an idle poll
    store out's results, late events and alerts with engine.snapshot() (one fenced
    transaction: StoreEngineOutputs with a checkpoint), then the fenced XACK
    engine.set_definitions(windows, rules)                            # when definitions change

Order and batching. The partition's watermark (clock.py) moves per event, and both parts see
it so: the windows close before the next event is applied (windows.py), and an event at or
before the watermark *as it stood when the event arrived* is late for the rules. The pattern
engine alone would judge lateness against the watermark of the previous batch; judging it here
per event makes the rules' input, like the windows', independent of how the stream was cut into
batches, so a new owner that re-reads the uncommitted entries in other batches computes the
same results, late events and alert ids (stored once by their identities). Processing time
(`now_nanos`) only matters to an idle partition, whose watermark advances after the idle
timeout; the engine never reads a clock.

Definition changes (`set_definitions`, applied at a batch boundary; by event time, so a replay
does the same):
- Windows: a definition whose (id, version) is unchanged keeps its open windows; a new version
  is a new definition that starts empty, and the old version's open windows are dropped
  unemitted; a disabled (or removed) window is dropped with its state. So a new window version
  should be written at a window boundary. (A window document has no activation time.)
- Rules: all versions are given (disabled ones included, as the definition follower keeps them).
  A new version matches events from its activation (or the watermark + 1 ns, when that is
  later); the old version's half-matched patterns that began before the activation run on until
  they complete or expire by their `within`, so an edit does not lose an attack half seen; a
  disabled version stops the older ones at its activation and drops their partial state once the
  watermark passes it. See patterns/ruleset.py.

Duplicates: the caller gives each stream entry once (the checkpoint's `last_entry_id` says where
to resume), but the queue can hold one event id twice (a publish retried beyond ingest's
idempotency window, an id reused). A (tenant, type, id) repeated while it could still change a
window is dropped before the windows and the rules (dedupe.py: ids kept per bucket of event time
until the watermark passes the windows' horizon, in the snapshot) and counted in
`duplicates`; a repeat beyond the horizon is late for every window and becomes a late event.
The rules also ignore an event id they hold or took recently (patterns/engine.py).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from services.processor.engine.clock import ClockConfig
from services.processor.engine.dedupe import DuplicateFilter
from services.processor.engine.events import EngineEvent
from services.processor.engine.patterns import Alert, PatternEngine, PatternEngineConfig
from services.processor.engine.window_defs import WindowDef
from services.processor.engine.window_outputs import LateEvent, WindowResult
from services.processor.engine.windows import SnapshotError, WindowEngine
from streammesh.definitions.rules import Rule

__all__ = [
    "RULE_LATE_REASON",
    "SNAPSHOT_FORMAT",
    "PartitionEngine",
    "PartitionOutputs",
    "RuleLateEvent",
    "SnapshotError",
    "entry_id_key",
]

SNAPSHOT_FORMAT = 2
"""Bumped when the layout below changes; a snapshot of another format is refused, except format
1 (before the duplicate filter's part), restored with no remembered ids."""
_PARTS = {1: 3, 2: 4}
_MAGIC = b"SMPE"
_HEAD = struct.Struct(">4sHq")  # magic, format, partition
_LENGTH = struct.Struct(">I")

RULE_LATE_REASON = "pattern rules: event time at or before the partition's watermark"


class RuleLateEvent(NamedTuple):
    """An event that came at or before the partition's watermark, for one running rule version
    that would have taken it: every event up to the watermark has been matched and alerted on,
    so it is not matched. Stored as a late event of source `rule` (window start 0)."""

    tenant: str
    rule_id: str
    rule_version: int
    event_id: str
    event_key: str
    event_time_nanos: int
    watermark_nanos: int
    reason: str = RULE_LATE_REASON


@dataclass(slots=True)
class PartitionOutputs:
    """What one `process` call emitted, in emission order."""

    window_results: list[WindowResult] = field(default_factory=list)
    window_late: list[LateEvent] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    rule_late: list[RuleLateEvent] = field(default_factory=list)
    watermark_nanos: int = 0
    """The partition's watermark after the call."""
    ungrouped: int = 0
    """Events of a window's tenant and type that lacked its group-by field (not counted)."""
    duplicate_ids: list[str] = field(default_factory=list)
    """Ids dropped as repeats, in stream order: by the partition's filter (before the windows
    and rules; also counted in `duplicates`), then those the rules had taken already."""
    duplicates: int = 0
    """Events dropped by the partition's filter as a repeat of a (tenant, type, id) taken while
    it could still change a window (dedupe.py)."""

    def __len__(self) -> int:
        """How many items there are to store."""
        return (
            len(self.window_results)
            + len(self.window_late)
            + len(self.alerts)
            + len(self.rule_late)
        )


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """A Redis stream entry id (`<ms>-<seq>`) as a tuple that compares in stream order; the
    empty id (nothing covered yet) is before every entry."""
    if not entry_id:
        return (-1, -1)
    ms, _, seq = entry_id.partition("-")
    if not (ms.isdigit() and seq.isdigit()):
        raise ValueError(f"entry id {entry_id!r}: expected <milliseconds>-<sequence>")
    return (int(ms), int(seq))


class PartitionEngine:
    """Windows and pattern rules of one partition. Not thread-safe."""

    def __init__(
        self,
        partition: int,
        clock: ClockConfig,
        windows: Sequence[WindowDef] = (),
        rules: Sequence[Rule] = (),
        *,
        pattern_config: PatternEngineConfig | None = None,
        _patterns: PatternEngine | None = None,
    ) -> None:
        self.partition = partition
        self._clock_config = clock
        self._windows = WindowEngine(windows, clock)
        self._dedupe = DuplicateFilter(windows)
        self._patterns = _patterns or PatternEngine(pattern_config)
        self._patterns.apply_rules(rules)
        self.last_entry_id = ""
        """The last stream entry whose events this state includes ("" for none)."""

    @property
    def watermark_nanos(self) -> int:
        return self._windows.watermark(self.partition)

    @property
    def window_definitions(self) -> tuple[WindowDef, ...]:
        return self._windows.definitions

    def set_definitions(self, windows: Sequence[WindowDef], rules: Sequence[Rule]) -> None:
        """Run exactly these window definitions and rule versions from now on (see the module
        docstring). A contradictory rule set raises RuleSetError and changes nothing."""
        self._patterns.apply_rules(rules)  # first: it is the part that can refuse
        self._windows.set_definitions(windows)
        self._dedupe.set_definitions(windows)

    def process(
        self, events: Sequence[EngineEvent], now_nanos: int, *, last_entry_id: str = ""
    ) -> PartitionOutputs:
        """Apply a batch (in stream order) at processing time `now_nanos`; `last_entry_id` is
        the last stream entry the batch covers (kept in the snapshot). An empty batch lets an
        idle partition's watermark advance."""
        partition = self.partition
        clock = self._windows.clock(partition)
        watermark, highest = clock.watermark, clock.max_event_time
        lateness = self._clock_config.out_of_orderness_nanos
        late_at: list[tuple[int, int]] = []
        repeat = self._dedupe.seen
        duplicates: list[str] = []
        dropped: list[int] = []
        # The watermark each event meets on arrival, as the clock will move it (clock.observe).
        for index, event in enumerate(events):
            if event.partition != partition:
                raise ValueError(
                    f"event {event.id!r} is of partition {event.partition}, not {partition}"
                )
            t = event.event_time_nanos
            late = t <= watermark
            if not late and t > highest:
                highest = t
                if t - lateness > watermark:
                    watermark = t - lateness
            # A repeat leaves the watermark as it was: it never is a new maximum.
            if repeat(event.tenant, event.type, event.id, t, watermark):
                duplicates.append(event.id)
                dropped.append(index)
                continue
            if late:
                # Its index among the kept events (those before it, less the dropped ones).
                late_at.append((index - len(dropped), watermark))
        if dropped:
            gone = set(dropped)
            events = [event for index, event in enumerate(events) if index not in gone]
        window_out = self._windows.process(events, now_nanos)
        out = PartitionOutputs(
            window_results=window_out.results,
            window_late=window_out.late,
            ungrouped=window_out.ungrouped,
            duplicates=len(duplicates),
        )
        patterns = self._patterns
        on_time: Sequence[EngineEvent] = events
        if late_at:
            late_indexes = {index for index, _ in late_at}
            on_time = [e for i, e in enumerate(events) if i not in late_indexes]
            for index, seen in late_at:
                event = events[index]
                out.rule_late.extend(
                    RuleLateEvent(
                        event.tenant,
                        rule.id,
                        rule.version,
                        event.id,
                        event.key,
                        event.event_time_nanos,
                        seen,
                    )
                    for rule in patterns.rules_reading(event)
                )
        out.watermark_nanos = self._windows.watermark(partition)
        self._dedupe.expire(out.watermark_nanos)
        pattern_out = patterns.process(on_time, out.watermark_nanos)
        out.alerts = pattern_out.alerts
        out.duplicate_ids = duplicates + pattern_out.duplicate_ids
        if last_entry_id:
            self.last_entry_id = last_entry_id
        return out

    def snapshot(self) -> bytes:
        """The whole state as bytes: format, partition, last entry id, then the windows', the
        rules' and the duplicate filter's snapshots. The same state gives the same bytes (no processing time or
        set order is kept), and restoring it gives the same future outputs."""
        parts = (
            self.last_entry_id.encode(),
            self._windows.snapshot(self.partition),
            self._patterns.snapshot(),
            orjson.dumps(self._dedupe.snapshot()),
        )
        chunks = [_HEAD.pack(_MAGIC, SNAPSHOT_FORMAT, self.partition)]
        for part in parts:
            chunks.append(_LENGTH.pack(len(part)))
            chunks.append(part)
        return b"".join(chunks)

    @classmethod
    def restore(
        cls,
        data: bytes,
        clock: ClockConfig,
        windows: Sequence[WindowDef] = (),
        rules: Sequence[Rule] = (),
        *,
        partition: int | None = None,
        pattern_config: PatternEngineConfig | None = None,
    ) -> PartitionEngine:
        """An engine in the state `snapshot()` saved, running the definitions given now (state
        of window definitions no longer given is dropped; rules apply as `set_definitions`
        says). SnapshotError for bytes that are not a snapshot of this format, or of another
        partition than `partition` when that is given."""
        saved_partition, (entry, window_state, pattern_state, *filter_state) = _unpack(data)
        if partition is not None and partition != saved_partition:
            raise SnapshotError(f"snapshot of partition {saved_partition}, not {partition}")
        try:
            patterns = PatternEngine.restore(pattern_state, pattern_config)
        except (KeyError, TypeError, ValueError) as error:
            raise SnapshotError(f"partition snapshot: rules part: {error}") from None
        engine = cls(saved_partition, clock, windows, rules, _patterns=patterns)
        engine._windows.restore(saved_partition, window_state)
        try:
            engine._dedupe.restore(orjson.loads(filter_state[0]) if filter_state else [])
        except (orjson.JSONDecodeError, TypeError, ValueError) as error:
            raise SnapshotError(f"partition snapshot: duplicate filter part: {error}") from None
        try:
            engine.last_entry_id = entry.decode()
            entry_id_key(engine.last_entry_id)
        except (UnicodeDecodeError, ValueError) as error:
            raise SnapshotError(f"partition snapshot: last entry id: {error}") from None
        return engine


def _unpack(data: bytes) -> tuple[int, list[bytes]]:
    if len(data) < _HEAD.size:
        raise SnapshotError("not a partition engine snapshot: too short")
    magic, version, partition = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise SnapshotError("not a partition engine snapshot")
    count = _PARTS.get(version)
    if count is None:
        raise SnapshotError(f"partition snapshot format {version} is not {SNAPSHOT_FORMAT}")
    parts, offset = [], _HEAD.size
    for _ in range(count):
        if offset + _LENGTH.size > len(data):
            raise SnapshotError("partition snapshot: truncated")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            raise SnapshotError("partition snapshot: truncated")
        parts.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise SnapshotError("partition snapshot: trailing bytes")
    return partition, parts
