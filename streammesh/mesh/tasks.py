"""Background loops that really stop.

redis-py can lose a CancelledError that lands inside a command (redis/redis-py#2028; measured
here with redis 8.1: cancelling a task that loops on a pipelined XINFO/INFO leaves it running in
about one try out of ten). So a loop that calls Redis checks `raise_if_cancelled()` every round,
and whoever stops such a task uses `stop_task`, which cancels again while the task swallows it
and gives up after a bound instead of hanging a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

__all__ = ["raise_if_cancelled", "stop_task", "wait_event"]

log = logging.getLogger(__name__)


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that was requested but swallowed; called at the top of every
    round of a background loop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True if set. asyncio.timeout rather than
    wait_for: 3.11's wait_for can lose a cancellation that coincides with its timeout
    (CPython gh-86296)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def stop_task(task: asyncio.Task[object], *, timeout: float = 5.0) -> bool:
    """Cancel `task` and wait until it ends, re-cancelling every 100 ms, for at most `timeout`
    seconds. True once it ended; its exception, if any, is logged, not raised."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("task %s did not stop within %.1fs", task.get_name(), timeout)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.1, remaining))
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("task %s ended with %r", task.get_name(), error)
    return True
