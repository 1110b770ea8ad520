"""Deadlines that travel: the time left on the call a server is handling bounds the calls it
makes downstream.

Every mesh server runs the deadline layer (streammesh.mesh.interceptors.deadline), which
records each inbound call's deadline (the client's, else the service's default) where
`time_remaining()` reads it. grpc.aio runs every call in a task of its own, and a task copies
its context when it is created, so the value belongs to that one call and to the tasks its
handler starts, and never leaks into another call. The mesh client gives each outbound call
`outbound_timeout(own)`: the smaller of its own timeout and the time left, so a downstream
never works on a call its caller gave up on.

Cancellation needs no extra machinery: a cancelled inbound call cancels its handler's task,
and an outbound call awaited in that task is cancelled with it (grpc.aio sends RST_STREAM, the
downstream handler sees CancelledError). tests/test_mesh_resilience.py checks both.

Code outside a server handler (a worker loop, the CLI) bounds a unit of work the same way with
`deadline_scope(seconds)`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from streammesh.mesh.interceptors.deadline import time_remaining

__all__ = ["deadline_scope", "outbound_timeout", "remaining_seconds"]

_SCOPE: ContextVar[float | None] = ContextVar("streammesh_deadline_scope", default=None)
"""The deadline (time.monotonic()) of the innermost deadline_scope; None: none."""


def remaining_seconds() -> float | None:
    """Seconds left for the work at hand (never below 0): the sooner of the call being handled
    and any deadline_scope around this code; None when neither sets one."""
    left = time_remaining()
    scope = _SCOPE.get()
    if scope is not None:
        in_scope = max(0.0, scope - time.monotonic())
        left = in_scope if left is None else min(left, in_scope)
    return left


def outbound_timeout(own: float | None) -> float | None:
    """The timeout of an outbound call whose own timeout is `own` (None: none of its own): the
    smaller of `own` and `remaining_seconds()`."""
    left = remaining_seconds()
    if left is None:
        return own
    return left if own is None else min(own, left)


@contextmanager
def deadline_scope(seconds: float) -> Iterator[None]:
    """Bound the outbound calls made inside the block by `seconds` from now (a deadline already
    in force that comes sooner still holds)."""
    deadline = time.monotonic() + seconds
    outer = _SCOPE.get()
    token = _SCOPE.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _SCOPE.reset(token)
