"""The window engine: event-time windows over the partitions a processor owns.

How the worker uses it (per partition the worker owns, all calls synchronous and pure):

    engine = WindowEngine(definitions, ClockConfig(out_of_orderness_nanos=..., idle_timeout_nanos=...))
    engine.restore(partition, snapshot_bytes)        # when the lease is taken, if a checkpoint exists
    outputs = engine.process(batch, now_nanos)       # events in stream order; now = processing time
    outputs = engine.process([], now_nanos)          # on an idle poll, so idle partitions advance
    state = engine.snapshot(partition)               # store outputs + state, then the fenced XACK
    engine.release(partition)                        # when the lease is lost

`outputs.results` are the window results (final on close, then one revision per accepted late
event), `outputs.late` the events that missed a window beyond its allowed lateness, and
`outputs.watermarks` each partition's watermark after the call (the pattern rules take it).

Every decision depends on the events' order within their partition and on each event's time,
never on how they were batched: the watermark moves per event and closes windows before the
next event is applied. So replaying the same events from a restored snapshot gives the same
results with the same identities. Processing time only matters for idle partitions
(`ClockConfig.idle_timeout_nanos`; see clock.py): a replay across an idle period may close
windows at other points, which is safe when outputs and snapshot are committed together (a
replay then recomputes only what was never committed). See docs/processor-windows.md.

Definitions can be replaced at runtime (`set_definitions`): a definition whose id and version
are unchanged keeps its state; a new version is a new definition and starts empty (windows of
the old version are dropped with it, so a new version should be activated at a window
boundary).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from services.processor.engine.clock import ClockConfig, PartitionClock
from services.processor.engine.events import EngineEvent
from services.processor.engine.window_defs import WindowDef
from services.processor.engine.window_operators import (
    FixedWindows,
    SessionWindows,
    Timer,
    build_operator,
)
from services.processor.engine.window_outputs import WindowOutputs, WindowResult

__all__ = ["SNAPSHOT_FORMAT", "SnapshotError", "WindowEngine"]

SNAPSHOT_FORMAT = 1


class SnapshotError(ValueError):
    """Bytes that are not a snapshot of this engine's format."""


class _Partition:
    __slots__ = ("call", "clock", "dispatch", "heap", "operators")

    def __init__(
        self, partition: int, definitions: Sequence[WindowDef], clock: PartitionClock
    ) -> None:
        self.clock = clock
        self.heap: list[Timer] = []
        self.operators: dict[str, FixedWindows | SessionWindows] = {
            d.identity: build_operator(d, partition, self.heap) for d in definitions
        }
        self.call = -1
        self.dispatch: dict[str, dict[str, list[Callable[..., None]]]] = {}
        self.route()

    def route(self) -> None:
        """tenant -> event type -> the `add` of each operator for it (bound once, not per event)."""
        self.dispatch = {}
        for operator in self.operators.values():
            definition = operator.definition
            by_type = self.dispatch.setdefault(definition.tenant, {})
            by_type.setdefault(definition.event_type, []).append(operator.add)

    def fire(self, out: WindowOutputs) -> None:
        """Run every timer the watermark has passed, in timer order."""
        heap = self.heap
        watermark = self.clock.watermark
        operators = self.operators
        while heap and heap[0][0] <= watermark:
            _, kind, identity, group, ref = heapq.heappop(heap)
            operator = operators.get(identity)
            if operator is not None:
                operator.on_timer(kind, group, ref, watermark, out)


class WindowEngine:
    """Windows of every definition over every partition this processor owns."""

    def __init__(self, definitions: Sequence[WindowDef], clock: ClockConfig) -> None:
        self._clock_config = clock
        self._partitions: dict[int, _Partition] = {}
        self._calls = 0
        self.set_definitions(definitions)

    @property
    def definitions(self) -> tuple[WindowDef, ...]:
        return self._definitions

    def set_definitions(self, definitions: Sequence[WindowDef]) -> None:
        """Replace the definitions; state of unchanged (id, version) pairs is kept."""
        self._definitions = tuple(definitions)
        for number, partition in self._partitions.items():
            kept = partition.operators
            partition.operators = {
                d.identity: kept.get(d.identity) or build_operator(d, number, partition.heap)
                for d in self._definitions
            }
            partition.route()
            partition.heap[:] = [
                timer for timer in partition.heap if timer[2] in partition.operators
            ]
            heapq.heapify(partition.heap)

    def _partition(self, number: int) -> _Partition:
        partition = self._partitions.get(number)
        if partition is None:
            partition = _Partition(number, self._definitions, PartitionClock(self._clock_config))
            self._partitions[number] = partition
        return partition

    def process(self, events: Sequence[EngineEvent], now_nanos: int) -> WindowOutputs:
        """Apply events (in stream order per partition) at processing time `now_nanos`; then
        advance the watermark of every owned partition that had no event and is idle."""
        out = WindowOutputs()
        self._calls += 1
        call = self._calls
        touched: list[_Partition] = []
        partitions = self._partitions
        number: int | None = None
        tenant: str | None = None
        partition: _Partition | None = None
        by_type: dict[str, list[Callable[..., None]]] | None = None
        for event in events:
            if event.partition != number or partition is None:
                # A batch is mostly of one partition (and tenant): look them up on a change.
                number = event.partition
                partition = partitions.get(number)
                if partition is None:
                    partition = self._partition(number)
                if partition.call != call:
                    partition.call = call
                    touched.append(partition)
                clock = partition.clock
                heap = partition.heap
                tenant = None
            time = event.event_time_nanos
            if (
                time > clock.max_event_time
                and clock.observe(time)
                and heap
                and heap[0][0] <= clock.watermark
            ):
                partition.fire(out)
            if event.tenant != tenant:
                tenant = event.tenant
                by_type = partition.dispatch.get(tenant)
            if by_type is None:
                continue
            adders = by_type.get(event.type)
            if adders is None:
                continue
            watermark = clock.watermark
            for add in adders:
                add(event, time, watermark, out)
        for partition in touched:
            partition.clock.arrived(now_nanos)
        # In partition order, so that outputs do not depend on which partition was seen first.
        for number in sorted(partitions):
            partition = partitions[number]
            if partition.call != call and partition.clock.idle_advance(now_nanos):
                partition.fire(out)
        out.watermarks = {
            number: partitions[number].clock.watermark for number in sorted(partitions)
        }
        return out

    def current(self, partition: int) -> list[WindowResult]:
        """Live views of the partition's open windows, per definition: revision -1, for live
        subscriptions (`final()` results come from `process`; these are never stored)."""
        state = self._partition(partition)
        watermark = state.clock.watermark
        return [
            result
            for definition in self._definitions
            for result in state.operators[definition.identity].current(watermark)
        ]

    def partitions(self) -> list[int]:
        """The partitions with state (owned and seen, or restored)."""
        return sorted(self._partitions)

    def clock(self, partition: int) -> PartitionClock:
        return self._partition(partition).clock

    def watermark(self, partition: int) -> int:
        return self._partition(partition).clock.watermark

    def release(self, partition: int) -> None:
        """Forget a partition (its lease went to another processor)."""
        self._partitions.pop(partition, None)

    def snapshot(self, partition: int) -> bytes:
        """The partition's state (clock, open windows, timers) as bytes for a checkpoint."""
        state = self._partition(partition)
        operators = state.operators
        timers: list[Timer] = []
        for timer in state.heap:
            operator = operators.get(timer[2])
            if isinstance(operator, FixedWindows):
                timers.extend(operator.timers_for(timer))
            else:
                timers.append(timer)
        # Sorted: a valid heap (what a reader heapifies), and the same bytes for the same
        # timers whatever the heap's layout.
        timers.sort()
        document: dict[str, Any] = {
            "format": SNAPSHOT_FORMAT,
            "clock": list(state.clock.snapshot()),
            "timers": timers,
            "operators": {identity: op.snapshot() for identity, op in state.operators.items()},
        }
        return orjson.dumps(document)

    def restore(self, partition: int, data: bytes) -> None:
        """Replace the partition's state with a snapshot. State of definitions no longer
        defined is dropped; definitions new since the snapshot start empty."""
        try:
            document = orjson.loads(data)
            if document.get("format") != SNAPSHOT_FORMAT:
                raise SnapshotError(
                    f"snapshot format {document.get('format')!r} is not {SNAPSHOT_FORMAT}"
                )
            max_event_time, watermark = document["clock"]
            state = _Partition(
                partition,
                self._definitions,
                PartitionClock(self._clock_config, (max_event_time, watermark)),
            )
            for identity, op_state in document["operators"].items():
                operator = state.operators.get(identity)
                if operator is not None:
                    operator.restore(op_state)
            # Timers are totally ordered, so the order they pop in does not depend on the
            # saved list's layout. A fixed window's per-group timers become its start's one.
            timers: set[Timer] = set()
            session_timers: list[Timer] = []
            for time, kind, identity, group, ref in document["timers"]:
                operator = state.operators.get(identity)
                if isinstance(operator, FixedWindows):
                    timers.add((time, kind, identity, "", ref))
                elif operator is not None:
                    session_timers.append((time, kind, identity, group, ref))
            state.heap.extend(sorted(timers))
            state.heap.extend(session_timers)
            heapq.heapify(state.heap)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            if isinstance(error, SnapshotError):
                raise
            raise SnapshotError(f"not a window engine snapshot: {error}") from None
        self._partitions[partition] = state
