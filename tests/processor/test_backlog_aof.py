"""The backlog counters after Redis lost the end of its AOF (appendfsync everysec loses up to a
second on a power failure): the AOF is cut short at several points and Redis started on each
copy. Whatever was lost, the counters agree with the streams (the exact reconcile finds no
drift), because each script's writes are one MULTI/EXEC in the AOF and Redis drops an
incomplete one when it loads."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis

from services.processor.source.backlog import BacklogKeeper
from services.processor.source.ownership import PartitionOwnership
from streammesh.backlog import Backlog, read_backlog
from streammesh.entries import Entry
from streammesh.streams import StreamLayout
from tests.faults.backends import RedisServer
from tests.processor.conftest import append

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server to kill and restart"
)

CUTS = (0.35, 0.6, 0.85)
"""Where the AOF is cut, as shares of its length (mid-command, mid-transaction or between)."""


async def _fill(client: aioredis.Redis, layout: StreamLayout) -> None:
    """Appends and acknowledgements interleaved, as the pipeline writes them."""
    await layout.ensure_group(client)
    owner = PartitionOwnership(client, layout, "c1", lease_ttl_ms=60_000, heartbeat_ms=100)
    await owner.acquire(range(layout.partitions))
    for n in range(60):
        partition = n % layout.partitions
        await append(client, layout, partition, [f"e{n}-{i}" for i in range(n % 7 + 1)])
        if n % 3 == 2:
            reply = cast(
                list[tuple[bytes, list[Entry]]] | None,
                await client.xreadgroup(
                    layout.group, "c1", {layout.stream(partition): ">"}, count=2
                ),
            )
            entries = reply[0][1] if reply else []
            assert await owner.ack(partition, *entries)


async def test_a_lost_aof_suffix_leaves_the_counters_exact(tmp_path: Path) -> None:
    layout = StreamLayout(prefix="aof:events", partitions=2)
    server = RedisServer(tmp_path / "full", fsync="everysec")
    server.start()
    try:
        client = aioredis.Redis.from_url(server.url)
        try:
            await _fill(client, layout)
            before = sum(b.events for b in await read_backlog(client, layout))
        finally:
            await client.aclose()
    finally:
        server.stop(signal.SIGKILL)
    (aof,) = (tmp_path / "full" / "appendonlydir").glob("*.incr.aof")
    size = aof.stat().st_size
    survived = []
    for cut in CUTS:
        copy = tmp_path / f"cut-{cut}"
        shutil.copytree(tmp_path / "full", copy)
        with (copy / "appendonlydir" / aof.name).open("r+b") as handle:
            handle.truncate(int(size * cut))
        restarted = RedisServer(copy, fsync="everysec")
        restarted.start()
        try:
            client = aioredis.Redis.from_url(restarted.url)
            try:
                keeper = BacklogKeeper(client, layout, "checker")
                drifts = []
                for partition in range(layout.partitions):
                    await client.set(layout.lease_key(partition), "checker")
                    drifts.append(await keeper.reconcile(partition))
                assert drifts == [Backlog()] * layout.partitions, f"cut at {cut}: {drifts}"
                survived.append(sum([int(await client.xlen(s)) for s in layout.streams()]))
            finally:
                await client.aclose()
        finally:
            restarted.stop(signal.SIGKILL)
    print(f"\n[aof cut] entries left at cuts {CUTS}: {survived} (60 written, {before} unacked)")
    assert survived == sorted(survived) and survived[0] < survived[-1] < 60, survived
