"""Say where a hung test waits: shortly before pytest-timeout fails a test, print the stack of
every asyncio task of the running loop (pytest-timeout only prints thread stacks, and with one
event loop for the session those all show the loop idling in select())."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

__all__ = ["TaskDumpTimer"]

LEAD_SECONDS = 10.0
"""How long before the test's timeout the tasks are printed."""


def _await_chain(task: asyncio.Task[object]) -> list[str]:
    """file:line of every coroutine in the chain the task awaits, outermost first (a task's
    own stack shows only its outermost coroutine)."""
    lines: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(lines) < 40:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return lines


def _dump_tasks(label: str) -> None:
    tasks = asyncio.all_tasks()
    print(f"\n+++ {label}: {len(tasks)} asyncio task(s) +++", file=sys.stderr)
    for task in tasks:
        print(f"--- {task.get_name()}", file=sys.stderr)
        for line in _await_chain(task):
            print(f"    {line}", file=sys.stderr)
    sys.stderr.flush()


class TaskDumpTimer:
    """Arms a timer that asks `loop` to print its tasks `LEAD_SECONDS` before `timeout`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, label: str) -> None:
        self._loop = loop
        self._label = label
        self._timer = threading.Timer(max(1.0, timeout - LEAD_SECONDS), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        if self._loop.is_closed():
            return
        print(f"\n+++ {self._label}: still running; asking its loop for its tasks", file=sys.stderr)
        self._loop.call_soon_threadsafe(_dump_tasks, self._label)

    def __enter__(self) -> TaskDumpTimer:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()
