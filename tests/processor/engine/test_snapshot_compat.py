"""Snapshots across engine versions: a format 2 snapshot written before fixed windows kept one
timer per window start (per-group timers, in heap order) restores and goes on as the
uninterrupted run does; and the snapshots written now are still format 2's layout: one CLOSE
timer per open window and one PURGE timer per emitted one, per group, as a sorted list."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from services.processor.engine.events import EngineEvent
from services.processor.engine.partition import PartitionEngine, PartitionOutputs
from services.processor.engine.window_operators import CLOSE, PURGE
from tests.processor.engine.test_partition import (
    CLOCK,
    SETTINGS,
    comparable,
    engine,
    rules,
    windows,
)

FIXTURE = Path(__file__).parent / "snapshots" / "partition_format2_per_group_timers.bin"
SPLIT = 240
"""The fixture is the snapshot of `engine()` after `stream()[:SPLIT]` in batches of 17."""


def stream() -> list[EngineEvent]:
    """400 events of 5 keys and 3 groups: mostly forward, some out of order, some beyond the
    allowed lateness, some repeated (the fixture was made from exactly these)."""
    rng = random.Random(20261201)
    events: list[EngineEvent] = []
    t = 0
    for n in range(400):
        if events and rng.random() < 0.05:
            events.append(events[-rng.randint(1, min(len(events), 30))])
            continue
        t += rng.randint(0, 4)
        at = max(0, t - rng.randint(0, 60)) if rng.random() < 0.15 else t
        payload: dict[str, Any] = {"g": rng.choice(["x", "y", "z"])}
        if rng.random() < 0.8:
            payload["v"] = rng.randint(0, 10)
        events.append(
            EngineEvent(
                id=f"e{n:03d}",
                key=f"k{rng.randint(1, 5)}",
                type=rng.choice(["a", "a", "a", "b", "c"]),
                event_time_nanos=at,
                partition=3,
                tenant="acme",
                payload=payload,
            )
        )
    return events


def run(engine_: PartitionEngine, events: list[EngineEvent], batch: int) -> list[PartitionOutputs]:
    return [
        engine_.process(
            events[i : i + batch], 0, last_entry_id=f"{i + len(events[i : i + batch])}-0"
        )
        for i in range(0, len(events), batch)
    ]


def test_a_format_2_snapshot_from_before_restores_and_goes_on_as_the_uninterrupted_run() -> None:
    events = stream()
    saved = FIXTURE.read_bytes()
    restored = PartitionEngine.restore(saved, CLOCK, windows(), rules(), partition=3)
    uninterrupted = engine()
    run(uninterrupted, events[:SPLIT], 17)
    # The same state: the bytes differ only in the timers' order (a heap then, sorted now).
    assert restored.snapshot() == uninterrupted.snapshot()
    document = window_part(saved)
    assert sorted(map(tuple, document["timers"])) == sorted(
        map(tuple, window_part(restored.snapshot())["timers"])
    )
    tail = events[SPLIT:]
    assert comparable(run(restored, tail, 23), exact=True) == comparable(
        run(uninterrupted, tail, 23), exact=True
    )


def window_part(snapshot: bytes) -> dict[str, Any]:
    offset = 4 + 2 + 8
    for _ in range(2):  # the last entry id, then the windows' part
        length = int.from_bytes(snapshot[offset : offset + 4], "big")
        offset += 4
        part = snapshot[offset : offset + length]
        offset += length
    document: dict[str, Any] = orjson.loads(part)
    return document


@SETTINGS
@given(st.integers(0, 400), st.integers(1, 60))
def test_snapshots_keep_one_timer_per_group_and_window_sorted(split: int, batch: int) -> None:
    engine_ = engine()
    run(engine_, stream()[:split], batch)
    document = window_part(engine_.snapshot())
    timers = [tuple(timer) for timer in document["timers"]]
    assert timers == sorted(timers)
    lateness = {d.identity: d.allowed_lateness_nanos for d in windows()}
    sizes = {d.identity: d.size_nanos for d in windows() if d.kind != "session"}
    expected = set()
    for identity, state in document["operators"].items():
        if identity not in sizes:
            continue
        for group, start, revision in state["windows"]:
            end = start + sizes[identity]
            expected.add(
                (end, CLOSE, identity, group, start)
                if revision == -1
                else (end + lateness[identity], PURGE, identity, group, start)
            )
    assert {t for t in timers if t[2] in sizes} == expected
    assert len([t for t in timers if t[2] in sizes]) == len(expected)


def write_fixture() -> None:
    """Run with the engine of before (PYTHONPATH at its checkout) to make the fixture."""
    engine_ = engine()
    run(engine_, stream()[:SPLIT], 17)
    FIXTURE.write_bytes(engine_.snapshot())
