"""`streammesh report --load RATE`: the report drives its own load through the gateway while it
measures, with the saved session (which needs the producer role): batches of 100 JSON events on
one Publish stream, on a fixed schedule, for the window. It counts what was acknowledged, so the
report can print its own measured rate beside the load's."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from streammesh.api.common.v1 import event_pb2
from streammesh.cli.session import logged_in_client
from streammesh.cli.stack import StackConfig

__all__ = ["LoadResult", "drive_load"]

BATCH = 100
KEYS = 64


@dataclass(frozen=True)
class LoadResult:
    acknowledged: int
    seconds: float


def _batch(run: str, first: int) -> list[event_pb2.Event]:
    return [
        event_pb2.Event(
            id=str(uuid.uuid4()),
            key=f"report-{(first + i) % KEYS}",
            type=f"report.load.{run}",
            payload=json.dumps({"n": first + i, "amount": (first + i) % 100}).encode(),
            content_type="application/json",
        )
        for i in range(BATCH)
    ]


async def drive_load(config: StackConfig, rate: float, seconds: float) -> LoadResult:
    """Publish about `rate` events/s for `seconds`; returns what the gateway acknowledged."""
    run = uuid.uuid4().hex[:8]
    batches = max(1, int(rate * seconds / BATCH))
    interval = seconds / batches

    async def scheduled() -> AsyncIterator[list[event_pb2.Event]]:
        start = time.monotonic()
        for n in range(batches):
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield _batch(run, n * BATCH)

    acknowledged = 0
    started = time.monotonic()
    async with logged_in_client(config) as client:
        async for ack in client.publish(scheduled(), timeout=seconds + 60):
            acknowledged += ack.accepted
    return LoadResult(acknowledged, time.monotonic() - started)
