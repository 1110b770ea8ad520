"""A straightforward reference for the window engine, for the property tests: replay the
watermark event by event, decide for each event and window whether it was accepted (it arrived
before the watermark passed the window's end plus the allowed lateness), then aggregate the
accepted events of each window by brute force."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from services.processor.engine.events import EngineEvent
from services.processor.engine.window_defs import WindowDef

NO_WATERMARK = -(2**63)


@dataclass
class Expected:
    """Per (partition, group, start, end): the accepted events; and the rejected
    (event id, window start) pairs."""

    windows: dict[tuple[int, str, int, int], list[EngineEvent]]
    on_time: dict[tuple[int, str, int, int], int]
    """How many of a window's events arrived before it closed (its final's count)."""
    revisions: dict[tuple[int, str, int, int], int]
    """How many accepted events arrived after the window closed."""
    late: set[tuple[str, int]]


def watermarks(events: Sequence[EngineEvent], out_of_orderness: int) -> list[int]:
    """The partition's watermark right after each event (the one the engine applies it with)."""
    marks: dict[int, int] = defaultdict(lambda: NO_WATERMARK)
    result = []
    for event in events:
        marks[event.partition] = max(
            marks[event.partition], event.event_time_nanos - out_of_orderness
        )
        result.append(marks[event.partition])
    return result


def idle_watermarks(
    calls: Sequence[tuple[Sequence[EngineEvent], int]], out_of_orderness: int, idle_timeout: int
) -> list[int]:
    """The watermark after each event when events come in calls `(batch, now)`: a partition
    without events in a call, idle for longer than the timeout since its last event's call,
    moves on by the excess from where it stood at that call."""
    marks: dict[int, int] = defaultdict(lambda: NO_WATERMARK)
    highest: dict[int, int] = defaultdict(lambda: NO_WATERMARK)
    last_call: dict[int, tuple[int, int]] = {}  # partition -> (now, watermark then)
    result = []
    for batch, now in calls:
        seen = set()
        for event in batch:
            p = event.partition
            seen.add(p)
            highest[p] = max(highest[p], event.event_time_nanos)
            marks[p] = max(marks[p], highest[p] - out_of_orderness)
            result.append(marks[p])
        for p in seen:
            last_call[p] = (now, marks[p])
        for p, (then, mark_then) in last_call.items():
            if p not in seen and now - then > idle_timeout:
                marks[p] = max(marks[p], mark_then + now - then - idle_timeout)
    return result


def expected_fixed(
    definition: WindowDef,
    events: Sequence[EngineEvent],
    out_of_orderness: int,
    marks: Sequence[int] | None = None,
) -> Expected:
    size, step, lateness = (
        definition.size_nanos,
        definition.step_nanos,
        definition.allowed_lateness_nanos,
    )
    windows: dict[tuple[int, str, int, int], list[EngineEvent]] = defaultdict(list)
    on_time: dict[tuple[int, str, int, int], int] = defaultdict(int)
    revisions: dict[tuple[int, str, int, int], int] = defaultdict(int)
    late: set[tuple[str, int]] = set()
    marks = watermarks(events, out_of_orderness) if marks is None else marks
    for event, watermark in zip(events, marks, strict=True):
        time = event.event_time_nanos
        # Every multiple of step from a size before the event to the event, by brute force.
        for start in range((time - size) // step * step, time + 1, step):
            end = start + size
            if not start <= event.event_time_nanos < end:
                continue
            if end + lateness <= watermark:
                late.add((event.id, start))
                continue
            identity = (event.partition, event.key, start, end)
            windows[identity].append(event)
            if end > watermark:
                on_time[identity] += 1
            else:
                revisions[identity] += 1
    return Expected(dict(windows), dict(on_time), dict(revisions), late)


def expected_sessions(
    definition: WindowDef,
    events: Sequence[EngineEvent],
    out_of_orderness: int,
    marks: Sequence[int] | None = None,
) -> Expected:
    gap, lateness = definition.gap_nanos, definition.allowed_lateness_nanos
    accepted: dict[tuple[int, str], list[EngineEvent]] = defaultdict(list)
    late: set[tuple[str, int]] = set()
    marks = watermarks(events, out_of_orderness) if marks is None else marks
    for event, watermark in zip(events, marks, strict=True):
        if event.event_time_nanos + gap + lateness <= watermark:
            late.add((event.id, event.event_time_nanos))
        else:
            accepted[event.partition, event.key].append(event)
    windows: dict[tuple[int, str, int, int], list[EngineEvent]] = {}
    for (partition, group), members in accepted.items():
        members = sorted(members, key=lambda e: e.event_time_nanos)
        session = [members[0]]
        for event in members[1:]:
            if event.event_time_nanos - session[-1].event_time_nanos < gap:
                session.append(event)
            else:
                windows[
                    partition,
                    group,
                    session[0].event_time_nanos,
                    session[-1].event_time_nanos + gap,
                ] = session
                session = [event]
        windows[
            partition, group, session[0].event_time_nanos, session[-1].event_time_nanos + gap
        ] = session
    return Expected(windows, {}, {}, late)


def check_values(values: dict[str, float | int | None], events: Sequence[EngineEvent]) -> None:
    """The engine's values against brute-force aggregates (quantiles within DDSketch's bound)."""
    amounts = [e.payload["amount"] for e in events if type(e.payload.get("amount")) in (int, float)]
    assert values["n"] == len(events)
    users = {e.payload["user"] for e in events if "user" in e.payload}
    assert values["users"] == len(users)
    if not amounts:
        assert values["total"] is None and values["low"] is None and values["p99"] is None
        return
    assert math.isclose(values["total"] or 0, sum(amounts), rel_tol=1e-9, abs_tol=1e-9)
    assert values["low"] == min(amounts)
    assert values["high"] == max(amounts)
    assert math.isclose(values["avg"] or 0, sum(amounts) / len(amounts), rel_tol=1e-9, abs_tol=1e-9)
    ordered = sorted(amounts)
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        true = ordered[math.floor(q * (len(ordered) - 1))]
        estimate = values[name]
        assert estimate is not None
        assert abs(estimate - true) <= 0.01 * abs(true) + 1e-9, (name, estimate, true)
