"""stop_task and raise_if_cancelled against a loop that swallows cancellations, the way redis-py
can when a CancelledError lands inside a command."""

from __future__ import annotations

import asyncio
import contextlib

from streammesh.mesh.tasks import raise_if_cancelled, stop_task


async def _swallowing_loop(swallowed: list[int], swallow: int) -> None:
    """Loops forever; the first `swallow` cancellations are caught, dropped and recorded."""
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if len(swallowed) == swallow:
                raise
            swallowed.append(1)


async def test_a_swallowed_cancellation_is_raised_at_the_next_round() -> None:
    rounds: list[int] = []

    async def loop_with_check() -> None:
        while True:
            raise_if_cancelled()
            rounds.append(1)
            with contextlib.suppress(asyncio.CancelledError):  # as redis-py#2028 does
                await asyncio.sleep(0.01)

    task = asyncio.create_task(loop_with_check())
    await asyncio.sleep(0.03)
    task.cancel()
    rounds_at_cancel = len(rounds)
    await asyncio.wait({task}, timeout=2)
    assert task.cancelled()
    # The sleep swallowed the cancel; the check at the top of the next round ended the loop.
    assert rounds_at_cancel > 0 and len(rounds) == rounds_at_cancel


async def test_stop_task_cancels_again_until_the_task_ends() -> None:
    swallowed: list[int] = []
    task = asyncio.create_task(_swallowing_loop(swallowed, swallow=3))
    await asyncio.sleep(0.02)
    assert await stop_task(task, timeout=5)
    assert task.cancelled()
    assert len(swallowed) == 3, "stop_task cancelled again after each swallowed cancel"


async def test_stop_task_gives_up_after_its_bound() -> None:
    stop = asyncio.Event()

    async def immortal() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0.02)  # inside its loop: a task cancelled before its first step just ends
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await stop_task(task, timeout=0.3)
    assert 0.3 <= loop.time() - started < 2
    stop.set()
    await task
