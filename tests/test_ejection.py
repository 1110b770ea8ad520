"""The Ejector's rules, on a clock the test moves: outage codes only, consecutive and windowed
ejection, the share cap, the doubling ejection time and probation."""

from __future__ import annotations

import grpc
import pytest

from streammesh.mesh.ejection import EjectionPolicy, Ejector

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ejector(replicas: int = 3, **policy: object) -> tuple[Ejector, Clock]:
    clock = Clock()
    return Ejector(replicas, EjectionPolicy(**policy), clock=clock), clock  # type: ignore[arg-type]


def test_consecutive_outages_eject() -> None:
    ej, _ = ejector(consecutive_outages=3)
    for _ in range(2):
        ej.record(0, UNAVAILABLE)
    assert ej.ejected() == []
    ej.record(0, UNAVAILABLE)
    assert ej.ejected() == [0]
    assert ej.admitted() == [1, 2]


def test_a_success_resets_the_run() -> None:
    ej, _ = ejector(consecutive_outages=3, window_min_calls=1000)
    for _ in range(10):
        ej.record(0, UNAVAILABLE)
        ej.record(0, UNAVAILABLE)
        ej.record(0, OK)
    assert ej.ejected() == []


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
    ],
)
def test_answers_never_count(code: grpc.StatusCode) -> None:
    ej, _ = ejector(consecutive_outages=1, window_min_calls=1)
    for _ in range(100):
        ej.record(0, code)
    assert ej.ejected() == []


def test_outage_ratio_over_the_window_ejects() -> None:
    ej, clock = ejector(consecutive_outages=100, outage_ratio=0.5, window_min_calls=10)
    for _ in range(5):
        ej.record(1, OK)
        ej.record(1, UNAVAILABLE)
        clock.now += 0.1
    assert ej.ejected() == [1]


def test_old_outcomes_leave_the_window() -> None:
    ej, clock = ejector(consecutive_outages=100, window_seconds=1, window_min_calls=4)
    for _ in range(3):
        ej.record(0, UNAVAILABLE)
        ej.record(0, OK)
    clock.now += 2  # the six above are gone
    ej.record(0, OK)
    ej.record(0, OK)
    ej.record(0, UNAVAILABLE)
    assert ej.ejected() == []


def test_a_deadline_with_little_time_is_not_blamed() -> None:
    ej, _ = ejector(consecutive_outages=2, deadline_floor_seconds=0.05)
    for _ in range(10):
        ej.record(0, DEADLINE, attempt_seconds=0.01)
    assert ej.ejected() == []
    ej.record(0, DEADLINE, attempt_seconds=0.5)
    ej.record(0, DEADLINE, attempt_seconds=0.5)
    assert ej.ejected() == [0]


@pytest.mark.parametrize(
    ("replicas", "percent", "most"),
    [(1, 50, 0), (2, 50, 1), (2, 100, 1), (3, 50, 1), (4, 50, 2), (5, 10, 1), (3, 0, 0)],
)
def test_never_more_than_the_share(replicas: int, percent: int, most: int) -> None:
    ej, _ = ejector(replicas, consecutive_outages=1, max_ejection_percent=percent)
    for _ in range(3):
        for index in range(replicas):
            ej.record(index, UNAVAILABLE)
    assert len(ej.ejected()) == most
    assert ej.admitted()


def test_ejection_time_doubles_on_probation_and_a_streak_ends() -> None:
    ej, clock = ejector(consecutive_outages=1, base_ejection_seconds=1, max_ejection_seconds=4)
    ej.record(0, UNAVAILABLE)
    clock.now += 0.99
    assert ej.ejected() == [0]
    clock.now += 0.02
    assert ej.ejected() == []  # back after 1 s, on probation
    ej.record(0, UNAVAILABLE)  # the first outage on probation ejects again: 2 s
    clock.now += 1.99
    assert ej.ejected() == [0]
    clock.now += 0.02
    ej.record(0, UNAVAILABLE)  # 4 s (the cap)
    clock.now += 3.99
    assert ej.ejected() == [0]
    clock.now += 0.02
    ej.record(0, OK)  # probation passed
    clock.now += 5  # in rotation longer than max_ejection_seconds: the streak starts again
    ej.record(0, UNAVAILABLE)
    clock.now += 1.01
    assert ej.ejected() == []
    assert ej.ejections(0) == 4


def test_outage_codes_refuse_answer_codes() -> None:
    with pytest.raises(ValueError, match="outage_codes"):
        EjectionPolicy(outage_codes=frozenset({grpc.StatusCode.INVALID_ARGUMENT}))
