from __future__ import annotations

import pytest

from services.processor.engine.clock import (
    NO_WATERMARK,
    ClockConfig,
    PartitionClock,
    combined_watermark,
)

CONFIG = ClockConfig(out_of_orderness_nanos=10, idle_timeout_nanos=100)


def test_the_watermark_is_the_largest_event_time_minus_the_out_of_orderness() -> None:
    clock = PartitionClock(CONFIG)
    assert clock.watermark == NO_WATERMARK
    assert clock.observe(50) is True
    assert clock.watermark == 40
    assert clock.observe(30) is False  # older: the watermark never goes backwards
    assert clock.watermark == 40
    assert clock.observe(50) is False
    assert clock.observe(55) is True
    assert clock.watermark == 45


def test_an_idle_partition_advances_with_processing_time_after_the_timeout() -> None:
    clock = PartitionClock(CONFIG)
    clock.observe(1_000)
    clock.arrived(now_nanos=5_000)
    assert clock.idle_advance(5_100) is False  # exactly the timeout: not idle yet
    assert clock.watermark == 990
    assert clock.idle_advance(5_130) is True
    assert clock.watermark == 1_020
    # An event resets the timer; the watermark keeps what it gained.
    clock.observe(1_001)
    clock.arrived(now_nanos=5_200)
    assert clock.watermark == 1_020
    assert clock.idle_advance(5_250) is False
    assert clock.idle_advance(5_310) is True
    assert clock.watermark == 1_030


def test_a_partition_that_never_saw_an_event_does_not_advance() -> None:
    clock = PartitionClock(CONFIG)
    assert clock.idle_advance(0) is False
    assert clock.idle_advance(10**12) is False
    assert clock.watermark == NO_WATERMARK


def test_a_restored_clock_starts_its_idle_timer_at_the_first_call_not_from_the_snapshot() -> None:
    clock = PartitionClock(CONFIG)
    clock.observe(1_000)
    clock.arrived(now_nanos=0)
    restored = PartitionClock(CONFIG, clock.snapshot())
    assert restored.watermark == 990
    # Hours of processing time later (a failover): the first call only starts the timer.
    assert restored.idle_advance(10**13) is False
    assert restored.watermark == 990
    assert restored.idle_advance(10**13 + 150) is True
    assert restored.watermark == 1_040


def test_the_combined_watermark_is_the_minimum_over_partitions_with_events() -> None:
    quiet, busy, never = PartitionClock(CONFIG), PartitionClock(CONFIG), PartitionClock(CONFIG)
    quiet.observe(100)
    busy.observe(500)
    assert combined_watermark([quiet, busy, never]) == 90
    assert combined_watermark([never]) == NO_WATERMARK


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_of_orderness_nanos": -1, "idle_timeout_nanos": 1}, "out_of_orderness_nanos"),
        ({"out_of_orderness_nanos": 0, "idle_timeout_nanos": 0}, "idle_timeout_nanos"),
    ],
)
def test_bad_clock_settings_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClockConfig(**kwargs)
