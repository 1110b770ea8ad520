"""The per-partition logic of one window definition: fixed windows (tumbling and hopping) and
session windows. An operator is built for one partition with that partition's timer heap; the
engine calls `add` per event (with the partition's watermark after that event) and `on_timer`
when the watermark passes a timer's time. Timers are `(time, kind, definition, group, ref)`
tuples in one heap per partition, so windows close in one deterministic order (by time, then
definition, group and start) however the events were batched. Fixed windows keep one timer per
window start for all its groups (group ""), and emit the groups sorted: the same order.

Hopping windows are kept as panes of gcd(size, step): each event updates one pane, and a
window's result merges its size/gcd panes when it is emitted (the sketches merge exactly).
A window (or pane) stays in state until the watermark passes its end plus the allowed
lateness; a session until its end plus gap plus lateness, the last moment an event that is
still accepted (time + gap + lateness > watermark) could merge with it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

from services.processor.engine.aggregates import Accumulator, AggregateLayout
from services.processor.engine.events import MISSING, EngineEvent, compile_field_path
from services.processor.engine.window_defs import WindowDef, window_starts
from services.processor.engine.window_outputs import LateEvent, WindowOutputs, WindowResult

__all__ = ["CLOSE", "PURGE", "FixedWindows", "SessionWindows", "Timer", "build_operator"]

CLOSE = 0
PURGE = 1
Timer = tuple[int, int, str, str, int]
"""(watermark time, CLOSE or PURGE, definition identity, group, window start or session id)."""


def _group_accessor(definition: WindowDef) -> Callable[[EngineEvent], str | None]:
    if definition.group_by == "key":
        return lambda event: event.key
    read = compile_field_path(definition.group_by)

    def group(event: EngineEvent) -> str | None:
        value = read(event)
        if value is MISSING or value is None:
            return None
        return value if type(value) is str else repr(value)

    return group


class _Operator:
    __slots__ = ("definition", "group_of", "heap", "identity", "layout", "partition")

    def __init__(self, definition: WindowDef, partition: int, heap: list[Timer]) -> None:
        self.definition = definition
        self.identity = definition.identity
        self.partition = partition
        self.heap = heap
        self.layout = AggregateLayout(definition.aggregates)
        self.group_of = _group_accessor(definition)

    def _result(
        self,
        group: str,
        start: int,
        end: int,
        revision: int,
        accumulator: Accumulator | None,
        watermark: int,
        retracted: bool = False,
    ) -> WindowResult:
        definition = self.definition
        # Positional: a result is built for nearly every window, and keywords cost more.
        return WindowResult(
            definition.tenant,
            definition.id,
            definition.version,
            self.partition,
            group,
            start,
            end,
            revision,
            {} if accumulator is None else self.layout.values(accumulator),
            watermark,
            retracted,
        )

    def _late(
        self, event: EngineEvent, group: str, start: int, end: int, watermark: int
    ) -> LateEvent:
        definition = self.definition
        return LateEvent(
            tenant=definition.tenant,
            window_id=definition.id,
            window_version=definition.version,
            partition=self.partition,
            event_id=event.id,
            event_key=event.key,
            group=group,
            event_time_nanos=event.event_time_nanos,
            watermark_nanos=watermark,
            window_start_nanos=start,
            window_end_nanos=end,
        )


class FixedWindows(_Operator):
    """Tumbling (step == size) and hopping windows of one definition in one partition.

    State is kept by window start, not by group: every group's window [start, start + size)
    closes at the same watermark, so one CLOSE and one PURGE timer per start serve all its
    groups (`(time, kind, identity, "", start)`), and the close emits the groups in sorted
    order, the order per-group timers `(time, kind, identity, group, start)` would pop in. A
    snapshot writes the per-group timers (`timers_for`), so its format is unchanged."""

    __slots__ = (
        "cached_first_end",
        "cached_pane",
        "cached_starts",
        "count_only",
        "lateness",
        "pane",
        "panes",
        "size",
        "step",
        "windows",
    )

    def __init__(self, definition: WindowDef, partition: int, heap: list[Timer]) -> None:
        super().__init__(definition, partition, heap)
        self.size = definition.size_nanos
        self.step = definition.step_nanos
        self.pane = math.gcd(self.size, self.step)
        self.lateness = definition.allowed_lateness_nanos
        self.count_only = self.layout.count_only
        self.panes: dict[int, dict[str, Accumulator]] = {}
        """pane start -> group -> accumulator."""
        self.windows: dict[int, dict[str, int]] = {}
        """window start -> group -> last emitted revision (-1 before the final). A start is
        here from its first window until its PURGE; it has a CLOSE timer pending while it
        holds an open window (-1), else a PURGE timer (a closed start takes no new open one:
        the watermark passed its end)."""
        self.cached_pane: int | None = None
        self.cached_first_end = 0
        self.cached_starts: range = range(0)

    def add(self, event: EngineEvent, time: int, watermark: int, out: WindowOutputs) -> None:
        group = self.group_of(event)
        if group is None:
            out.ungrouped += 1
            return
        pane_start = time - time % self.pane
        # Every event of a pane has the same windows (their bounds are multiples of the pane),
        # so the last pane's window starts serve the next events too.
        if pane_start != self.cached_pane:
            self.cached_pane = pane_start
            self.cached_starts = window_starts(pane_start, self.size, self.step)
            self.cached_first_end = self.cached_starts[0] + self.size
        if self.cached_first_end > watermark:
            # Every window of this event is still open: the common case.
            panes = self.panes.get(pane_start)
            if panes is None:
                panes = self.panes[pane_start] = {}
            accumulator = panes.get(group)
            if accumulator is None:
                accumulator = panes[group] = self.layout.new()
                windows = self.windows
                for start in self.cached_starts:
                    groups = windows.get(start)
                    if groups is None:
                        windows[start] = {group: -1}
                        heapq.heappush(
                            self.heap, (start + self.size, CLOSE, self.identity, "", start)
                        )
                    elif group not in groups:
                        groups[group] = -1
            if self.count_only:
                accumulator.count += 1
            else:
                accumulator.add(event)
            return
        self._add_late(event, group, time, pane_start, watermark, out)

    def _add_late(
        self,
        event: EngineEvent,
        group: str,
        time: int,
        pane_start: int,
        watermark: int,
        out: WindowOutputs,
    ) -> None:
        """An event some of whose windows have closed: late events, revisions, late finals."""
        size = self.size
        accepted = []
        for start in window_starts(time, size, self.step):
            if start + size + self.lateness <= watermark:
                out.late.append(self._late(event, group, start, start + size, watermark))
            else:
                accepted.append(start)
        if not accepted:
            return
        panes = self.panes.get(pane_start)
        if panes is None:
            panes = self.panes[pane_start] = {}
        accumulator = panes.get(group)
        if accumulator is None:
            accumulator = panes[group] = self.layout.new()
        accumulator.add(event)
        for start in accepted:
            end = start + size
            groups = self.windows.get(start)
            if groups is None:
                groups = self.windows[start] = {}
                # The start's first window: its timer (see `windows`).
                timer = (end, CLOSE) if end > watermark else (end + self.lateness, PURGE)
                heapq.heappush(self.heap, (*timer, self.identity, "", start))
            revision = groups.get(group)
            if end > watermark:
                if revision is None:
                    groups[group] = -1
                continue
            # Closed but within the allowed lateness: a new revision (or a late final when the
            # window had no event before).
            revision = 0 if revision is None else revision + 1
            groups[group] = revision
            out.results.append(self._emit(group, start, revision, watermark))

    def _emit(self, group: str, start: int, revision: int, watermark: int) -> WindowResult:
        if self.pane == self.size:
            panes = self.panes.get(start)
            accumulator = None if panes is None else panes.get(group)
        else:
            accumulator = self.layout.new()
            for pane_start in range(start, start + self.size, self.pane):
                panes = self.panes.get(pane_start)
                pane = None if panes is None else panes.get(group)
                if pane is not None:
                    accumulator.merge_from(pane)
        return self._result(group, start, start + self.size, revision, accumulator, watermark)

    def on_timer(self, kind: int, _: str, start: int, watermark: int, out: WindowOutputs) -> None:
        if kind == CLOSE:
            groups = self.windows.get(start)
            if groups is None:
                return
            results = out.results
            for group in sorted(groups):
                if groups[group] == -1:
                    groups[group] = 0
                    results.append(self._emit(group, start, 0, watermark))
            end = start + self.size
            heapq.heappush(self.heap, (end + self.lateness, PURGE, self.identity, "", start))
            return
        self.windows.pop(start, None)
        # A pane's last window is the one starting at or just before it: drop the panes whose
        # last window this was (each such pane's group has a window at this start).
        for pane_start in range(start, start + self.step, self.pane):
            self.panes.pop(pane_start, None)

    def timers_for(self, timer: Timer) -> list[Timer]:
        """One start's timer as the per-group timers of snapshot format 1."""
        time, kind, identity, _, start = timer
        groups = self.windows.get(start, {})
        return [
            (time, kind, identity, group, start)
            for group in sorted(groups)
            if (groups[group] == -1) == (kind == CLOSE)
        ]

    def current(self, watermark: int) -> list[WindowResult]:
        """Live views of the windows that are still open (revision -1, not for storage)."""
        return [
            self._emit(group, start, -1, watermark)
            for group, start in sorted(
                (group, start)
                for start, groups in self.windows.items()
                for group, revision in groups.items()
                if revision == -1
            )
        ]

    def snapshot(self) -> dict[str, Any]:
        # By group, sorted: the layout of snapshot format 1, and the same bytes for the same
        # state whatever order it was built in.
        by_group: dict[str, list[list[Any]]] = {}
        for start in sorted(self.panes):
            for group, pane in self.panes[start].items():
                by_group.setdefault(group, []).append([start, pane.snapshot()])
        return {
            "panes": [[group, by_group[group]] for group in sorted(by_group)],
            "windows": sorted(
                [group, start, revision]
                for start, groups in self.windows.items()
                for group, revision in groups.items()
            ),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.panes = {}
        for group, panes in state["panes"]:
            for start, pane in panes:
                self.panes.setdefault(start, {})[group] = Accumulator.restore(self.layout, pane)
        self.windows = {}
        for group, start, revision in state["windows"]:
            self.windows.setdefault(start, {})[group] = revision
        self.cached_pane = None


class _Session:
    __slots__ = ("accumulator", "emitted_end", "emitted_start", "last", "revision", "sid", "start")

    def __init__(self, sid: int, start: int, last: int, accumulator: Accumulator) -> None:
        self.sid = sid
        self.start = start
        self.last = last
        self.accumulator = accumulator
        self.revision = -1
        """Last emitted revision under (emitted_start, emitted_end); -1 when not emitted."""
        self.emitted_start = 0
        self.emitted_end = 0


class SessionWindows(_Operator):
    """Session windows of one definition in one partition: a session of a group is its events
    with gaps shorter than `gap` between them, and covers [first event, last event + gap)."""

    __slots__ = ("count_only", "gap", "groups", "lateness", "next_sid")

    def __init__(self, definition: WindowDef, partition: int, heap: list[Timer]) -> None:
        super().__init__(definition, partition, heap)
        self.count_only = self.layout.count_only
        self.gap = definition.gap_nanos
        self.lateness = definition.allowed_lateness_nanos
        self.groups: dict[str, list[_Session]] = {}
        """group -> its sessions in state, ordered by start."""
        self.next_sid = 0

    def add(self, event: EngineEvent, time: int, watermark: int, out: WindowOutputs) -> None:
        group = self.group_of(event)
        if group is None:
            out.ungrouped += 1
            return
        gap = self.gap
        if time + gap + self.lateness <= watermark:
            out.late.append(self._late(event, group, time, time + gap, watermark))
            return
        sessions = self.groups.get(group)
        if not sessions:
            # The commonest case: a group with nothing in state opens a session.
            if sessions is None:
                sessions = self.groups[group] = []
            self._open(sessions, group, event, time, watermark, out)
            return
        latest = sessions[-1]
        if latest.revision < 0 and latest.start <= time:
            # The common case: the event falls in or extends the latest session, which is
            # open. Sessions are at least `gap` apart, so no earlier one can touch it.
            if time < latest.last + gap:
                if self.count_only:
                    latest.accumulator.count += 1
                else:
                    latest.accumulator.add(event)
                if time > latest.last:
                    latest.last = time
                return
            touching = []
        else:
            touching = [s for s in sessions if s.start < time + gap and time < s.last + gap]
        if not touching:
            self._open(sessions, group, event, time, watermark, out)
            return
        target = touching[0]
        if len(touching) == 1 and target.revision < 0:
            target.accumulator.add(event)
            target.start = min(target.start, time)
            target.last = max(target.last, time)
            return
        for other in touching[1:]:
            self._retract(other, group, watermark, out)
            target.accumulator.merge_from(other.accumulator)
            target.start = min(target.start, other.start)
            target.last = max(target.last, other.last)
            sessions.remove(other)
        target.accumulator.add(event)
        target.start = min(target.start, time)
        target.last = max(target.last, time)
        end = target.last + gap
        if target.revision >= 0 and (target.emitted_start, target.emitted_end) == (
            target.start,
            end,
        ):
            target.revision += 1
            out.results.append(self._emit(target, group, watermark))
            return
        self._retract(target, group, watermark, out)
        if end <= watermark:
            self._final(target, group, watermark, out)
        else:
            heapq.heappush(self.heap, (end, CLOSE, self.identity, group, target.sid))

    def _open(
        self,
        sessions: list[_Session],
        group: str,
        event: EngineEvent,
        time: int,
        watermark: int,
        out: WindowOutputs,
    ) -> None:
        sid = self.next_sid
        self.next_sid = sid + 1
        session = _Session(sid, time, time, self.layout.new())
        if self.count_only:
            session.accumulator.count = 1
        else:
            session.accumulator.add(event)
        sessions.append(session)
        if len(sessions) > 1 and sessions[-2].start > time:
            sessions.sort(key=lambda s: s.start)
        end = time + self.gap
        if end <= watermark:
            self._final(session, group, watermark, out)
        else:
            heapq.heappush(self.heap, (end, CLOSE, self.identity, group, sid))

    def _retract(self, session: _Session, group: str, watermark: int, out: WindowOutputs) -> None:
        """The session was emitted under bounds it no longer has: withdraw that result."""
        if session.revision < 0:
            return
        out.results.append(
            self._result(
                group,
                session.emitted_start,
                session.emitted_end,
                session.revision + 1,
                None,
                watermark,
                retracted=True,
            )
        )
        session.revision = -1

    def _final(self, session: _Session, group: str, watermark: int, out: WindowOutputs) -> None:
        session.revision = 0
        session.emitted_start = session.start
        session.emitted_end = session.last + self.gap
        out.results.append(self._emit(session, group, watermark))
        purge_at = session.emitted_end + self.gap + self.lateness
        heapq.heappush(self.heap, (purge_at, PURGE, self.identity, group, session.sid))

    def _emit(self, session: _Session, group: str, watermark: int) -> WindowResult:
        return self._result(
            group,
            session.emitted_start,
            session.emitted_end,
            session.revision,
            session.accumulator,
            watermark,
        )

    def on_timer(self, kind: int, group: str, sid: int, watermark: int, out: WindowOutputs) -> None:
        sessions = self.groups.get(group)
        if sessions is None:
            return
        for session in sessions:
            if session.sid == sid:
                break
        else:
            return
        end = session.last + self.gap
        if kind == CLOSE:
            if session.revision >= 0:
                return
            if end > watermark:  # extended since the timer was set
                heapq.heappush(self.heap, (end, CLOSE, self.identity, group, sid))
            else:
                self._final(session, group, watermark, out)
            return
        if session.revision < 0:
            # A purge timer of an earlier final, and the session was retracted since (a late
            # merge changed its bounds): its CLOSE timer is pending and schedules a new purge.
            # Purging now would drop it unemitted when the watermark jumps past both timers.
            return
        purge_at = end + self.gap + self.lateness
        if purge_at > watermark:
            heapq.heappush(self.heap, (purge_at, PURGE, self.identity, group, sid))
            return
        sessions.remove(session)
        if not sessions:
            del self.groups[group]

    def current(self, watermark: int) -> list[WindowResult]:
        """Live views of the sessions that are still open (revision -1, not for storage)."""
        return [
            self._result(group, s.start, s.last + self.gap, -1, s.accumulator, watermark)
            for group in sorted(self.groups)
            for s in self.groups[group]
            if s.revision < 0
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            "next_sid": self.next_sid,
            "sessions": [
                [
                    group,
                    [
                        [
                            s.sid,
                            s.start,
                            s.last,
                            s.revision,
                            s.emitted_start,
                            s.emitted_end,
                            s.accumulator.snapshot(),
                        ]
                        for s in sessions
                    ],
                ]
                for group, sessions in self.groups.items()
            ],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.next_sid = state["next_sid"]
        self.groups = {}
        for group, sessions in state["sessions"]:
            restored = []
            for sid, start, last, revision, emitted_start, emitted_end, accumulator in sessions:
                session = _Session(sid, start, last, Accumulator.restore(self.layout, accumulator))
                session.revision = revision
                session.emitted_start = emitted_start
                session.emitted_end = emitted_end
                restored.append(session)
            self.groups[group] = restored


def build_operator(
    definition: WindowDef, partition: int, heap: list[Timer]
) -> FixedWindows | SessionWindows:
    if definition.kind == "session":
        return SessionWindows(definition, partition, heap)
    return FixedWindows(definition, partition, heap)
