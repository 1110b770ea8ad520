"""Outlier ejection that counts outages only: which replicas of one service take calls.

gRPC's own `outlier_detection_experimental` policy (C-core registers it; grpcio reaches it
through the service config) counts every non-OK status against a replica, so a replica that
answers a client's bad request with INVALID_ARGUMENT is ejected like a broken one, and a few
clients sending bad input could eject every healthy replica (tests/test_builtin_outlier_detection.py
shows it). The mesh client therefore keeps one channel per replica and asks an `Ejector` which
of them may take a call. The ejector is plain logic (no I/O, a clock passed in):

- Only outage codes count (`OUTAGE_CODES`): UNAVAILABLE (the replica is down, draining or
  refusing) and DEADLINE_EXCEEDED (it is too slow; counted only when the attempt had at least
  `deadline_floor_seconds`, so that a caller's nearly spent deadline is not blamed on the
  replica). Application answers (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED,
  FAILED_PRECONDITION, ...) and RESOURCE_EXHAUSTED never count: RESOURCE_EXHAUSTED is a
  healthy replica's back-pressure or a query refused as too large, and ejecting for it would
  pile its load onto the others. CANCELLED is the caller's doing.
- A replica is ejected after `consecutive_outages` outages in a row, or when at least
  `window_min_calls` calls in the last `window_seconds` ended with an outage ratio of
  `outage_ratio` or more.
- Never more than `max_ejection_percent` of the replicas are out at once (at least one may be
  when there are two or more, never all): past that share a failing replica keeps its share
  of calls (and the retry layer moves them on).
- An ejected replica comes back after `base_ejection_seconds * 2**(streak - 1)` (capped at
  `max_ejection_seconds`), on probation: its first outage ejects it again for twice as long; a
  replica that stays in for `max_ejection_seconds` starts its streak again from one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

__all__ = ["OUTAGE_CODES", "EjectionPolicy", "Ejector"]

OUTAGE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)
"""The statuses that count against a replica; every other one is an answer, not an outage."""


@dataclass(frozen=True)
class EjectionPolicy:
    """When a replica is taken out of rotation and when it comes back."""

    consecutive_outages: int = 5
    """Outages in a row that eject a replica."""
    outage_ratio: float = 0.5
    """Share of outages over the window that ejects a replica (0 < ratio <= 1)."""
    window_seconds: float = 10.0
    """How far back the ratio looks."""
    window_min_calls: int = 10
    """Calls the window must hold before its ratio counts."""
    base_ejection_seconds: float = 1.0
    """Time out of rotation after a first ejection; doubled at each ejection of a streak."""
    max_ejection_seconds: float = 30.0
    """The longest time out; also the time in rotation that ends a streak."""
    max_ejection_percent: int = 50
    """Largest share of the replicas out at once (at least one of two or more, never all)."""
    deadline_floor_seconds: float = 0.05
    """A DEADLINE_EXCEEDED counts only when the attempt had at least this long."""
    outage_codes: frozenset[grpc.StatusCode] = field(default=OUTAGE_CODES)
    """The statuses that count against a replica."""

    def __post_init__(self) -> None:
        if self.consecutive_outages < 1 or self.window_min_calls < 1:
            raise ValueError("consecutive_outages and window_min_calls must be at least 1")
        if not 0 < self.outage_ratio <= 1:
            raise ValueError("outage_ratio must be in (0, 1]")
        if not 0 < self.base_ejection_seconds <= self.max_ejection_seconds:
            raise ValueError("ejection times must satisfy 0 < base <= max")
        if self.window_seconds <= 0 or self.deadline_floor_seconds < 0:
            raise ValueError("window_seconds must be positive, deadline_floor_seconds >= 0")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be 0..100")
        if not self.outage_codes <= OUTAGE_CODES | {grpc.StatusCode.RESOURCE_EXHAUSTED}:
            # An answer code here would eject healthy replicas for their clients' mistakes.
            raise ValueError(
                "outage_codes may name UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED"
            )

    def max_ejected(self, replicas: int) -> int:
        """How many of `replicas` may be out at once."""
        if replicas < 2 or self.max_ejection_percent == 0:
            return 0
        return min(replicas - 1, max(1, replicas * self.max_ejection_percent // 100))


_BUCKETS = 10
"""The window is kept as this many buckets of counts, not one entry per call: a busy client
makes thousands of calls a second."""


@dataclass
class _Bucket:
    start: float
    calls: int = 0
    outages: int = 0


@dataclass
class _Replica:
    consecutive: int = 0
    window: deque[_Bucket] = field(default_factory=deque)
    calls_in_window: int = 0
    outages_in_window: int = 0
    ejected_until: float | None = None
    on_probation: bool = False
    streak: int = 0
    admitted_at: float = 0.0
    ejections: int = 0


class Ejector:
    """Outcomes of calls per replica (by index) in, the replicas that may take calls out."""

    def __init__(
        self,
        replicas: int,
        policy: EjectionPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or EjectionPolicy()
        self._clock = clock
        now = clock()
        self._replicas = [_Replica(admitted_at=now) for _ in range(replicas)]

    def admitted(self) -> list[int]:
        """The replicas in rotation now (an ejected one whose time is up comes back, on
        probation)."""
        now = self._clock()
        out = []
        for index, replica in enumerate(self._replicas):
            self._readmit(replica, now)
            if replica.ejected_until is None:
                out.append(index)
        return out

    @staticmethod
    def _readmit(replica: _Replica, now: float) -> None:
        if replica.ejected_until is not None and now >= replica.ejected_until:
            replica.ejected_until = None
            replica.on_probation = True
            replica.admitted_at = now

    def ejected(self) -> list[int]:
        """The replicas out of rotation now."""
        admitted = set(self.admitted())
        return [index for index in range(len(self._replicas)) if index not in admitted]

    def ejections(self, index: int) -> int:
        """How many times replica `index` was ejected so far."""
        return self._replicas[index].ejections

    def record(
        self, index: int, code: grpc.StatusCode, *, attempt_seconds: float | None = None
    ) -> None:
        """The outcome of one call on replica `index` (grpc.StatusCode.OK for a success);
        `attempt_seconds` is the time the attempt was given (None: no deadline)."""
        replica = self._replicas[index]
        now = self._clock()
        self._readmit(replica, now)
        if replica.ejected_until is not None:
            return  # a call that started before the ejection: it is out already
        outage = code in self.policy.outage_codes
        if not outage and code != grpc.StatusCode.OK:
            return  # an answer (or the caller's cancel): says nothing about the replica
        if (
            code == grpc.StatusCode.DEADLINE_EXCEEDED
            and attempt_seconds is not None
            and attempt_seconds < self.policy.deadline_floor_seconds
        ):
            return  # the caller's deadline was nearly spent: not the replica's fault
        self._count(replica, now, outage)
        if not outage:
            replica.consecutive = 0
            replica.on_probation = False
            return
        replica.consecutive += 1
        if self._should_eject(replica):
            self._eject(replica, now)

    def _count(self, replica: _Replica, now: float, outage: bool) -> None:
        width = self.policy.window_seconds / _BUCKETS
        window = replica.window
        while window and window[0].start <= now - self.policy.window_seconds:
            old = window.popleft()
            replica.calls_in_window -= old.calls
            replica.outages_in_window -= old.outages
        if not window or now >= window[-1].start + width:
            window.append(_Bucket(now))
        window[-1].calls += 1
        window[-1].outages += outage
        replica.calls_in_window += 1
        replica.outages_in_window += outage

    def _should_eject(self, replica: _Replica) -> bool:
        policy = self.policy
        if replica.on_probation or replica.consecutive >= policy.consecutive_outages:
            return True
        calls = replica.calls_in_window
        return (
            calls >= policy.window_min_calls
            and replica.outages_in_window >= policy.outage_ratio * calls
        )

    def _eject(self, replica: _Replica, now: float) -> None:
        policy = self.policy
        if len(self.ejected()) >= policy.max_ejected(len(self._replicas)):
            return  # the share is spent: this one keeps taking calls
        if now - replica.admitted_at >= policy.max_ejection_seconds and not replica.on_probation:
            replica.streak = 0  # in rotation long enough: a new streak
        replica.streak += 1
        replica.ejections += 1
        seconds = min(
            policy.base_ejection_seconds * 2 ** (replica.streak - 1), policy.max_ejection_seconds
        )
        replica.ejected_until = now + seconds
        replica.on_probation = False
        replica.consecutive = 0
        replica.window.clear()
        replica.calls_in_window = 0
        replica.outages_in_window = 0
