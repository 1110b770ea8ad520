"""Redis Cluster readiness (issue 11): every key of one partition carries the partition's hash
tag, and every script and command of the queue touches one slot.

The layout test does not trust a list of keys: it records every command that ingest's appends
(with and without the idempotency window, back-pressure sampling) and a processor's whole life
(key move, group, handover claim, backlog reconcile, reads, stores, a dead letter, acks, trims,
reclaim, lease scripts, leave) send to the real Redis, asks Redis itself which arguments are keys
(COMMAND GETKEYS), and checks their slots (redis-py's CRC16). The one command allowed to span
partitions is the processor's XREADGROUP over the streams it owns (streams.py says why).

The cluster test then runs the same building blocks against a real 3-node Redis Cluster, started
by the test on free loopback ports: no CROSSSLOT, no slot error."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from services.ingest.idempotency import IdempotencyWindow
from services.ingest.pressure import BackPressure, PressureLimits
from services.ingest.queue import StreamAppender
from services.processor.delivery import dead_letters
from services.processor.delivery.dead_letters import FailureCounter, attempts_key
from services.processor.delivery.store import PermanentStoreError, StoreResult
from services.processor.source import backlog
from services.processor.source import ownership as ownership_module
from services.processor.source.backlog import BacklogKeeper
from services.processor.source.ownership import PartitionOwnership, epoch_key
from services.processor.source.trimming import trim_partition
from services.processor.worker import StreamWorker, WorkerConfig
from streammesh.api.common.v1 import event_pb2
from streammesh.backlog import APPEND_SCRIPT, IDEMPOTENT_APPEND_SCRIPT
from streammesh.entries import QueuedBody
from streammesh.legacy_keys import legacy_key, move_legacy_keys
from streammesh.streams import StreamLayout

PARTITIONS = 3
SPANNING = {b"XREADGROUP"}
"""Commands that may name keys of several partitions (the processor's read of its streams)."""


class _Recorder:
    commands: list[tuple[bytes, ...]] = []


class RecordingConnection(aioredis.Connection):
    """A connection that keeps every command it sends (pipelines pack through here too)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        _Recorder.commands.append(tuple(_as_bytes(arg) for arg in args))
        return super().pack_command(*args)


def _sha(script: bytes) -> str:
    return hashlib.sha1(script).hexdigest()  # noqa: S324 (Redis names scripts by SHA-1)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def events_for_every_partition(layout: StreamLayout, tag: str) -> list[event_pb2.Event]:
    """A batch with events in every partition (keys picked by the layout's own hash)."""
    keys: dict[int, str] = {}
    n = 0
    while len(keys) < layout.partitions:
        keys.setdefault(layout.partition_for(f"key-{n}"), f"key-{n}")
        n += 1
    return [
        event_pb2.Event(id=f"{tag}-{p}-{i}", key=key, type="t", payload=b"{}")
        for p, key in sorted(keys.items())
        for i in range(2)
    ]


async def store_all_but_poison(raw: QueuedBody) -> StoreResult:
    columns = event_pb2.QueuedColumns.FromString(raw.data)
    if any(event_id.endswith("poison") for event_id in columns.ids):
        raise PermanentStoreError("poison")
    return StoreResult(inserted=len(columns.ids), duplicates=0)


async def queue_life(client: Any, layout: StreamLayout, *, worker_client: Any = None) -> None:
    """What ingest and a processor do to the queue, once each: see the module doc."""
    await move_legacy_keys(
        client,
        layout,
        {"epoch": lambda p: epoch_key(layout, p), "attempts": lambda p: attempts_key(layout, p)},
    )
    await layout.ensure_group(client)
    pressure = None
    if not isinstance(client, RedisCluster):
        # Its sample pipelines INFO with the counters, which redis-py's cluster client refuses
        # (and a cluster has one used_memory per node): left for the move to a cluster.
        pressure = BackPressure(client, layout, PressureLimits())
        await pressure.sample()
    guarded = StreamAppender(client, layout, pressure, window=IdempotencyWindow(seconds=60))
    events = events_for_every_partition(layout, "w")
    await guarded.append(events, producer="p")
    assert await guarded.append(events, producer="p")  # all duplicates now
    plain = StreamAppender(client, layout)
    await plain.append(events_for_every_partition(layout, "plain"), producer="p")
    poison = events_for_every_partition(layout, "x")[0]
    poison.id = "x-poison"
    await plain.append([poison], producer="p")
    # Entries of partition 0 pending under another consumer: the worker's takeover claims them.
    await client.xreadgroup(layout.group, "ghost", {layout.stream(0): ">"}, count=1)
    # Counters off: the takeover's reconcile corrects them (the ADJUST script).
    await client.hincrby(layout.unacked_key(1), "events", 1000)
    if worker_client is None:
        return
    worker = StreamWorker(
        worker_client,
        layout,
        consumer="c1",
        store=store_all_but_poison,
        config=WorkerConfig(
            read_count=16,
            block_ms=20,
            heartbeat_ms=50,
            claim_idle_ms=1,
            trim_interval_seconds=0.05,
            trim_retention_seconds=0,
            retry_backoff_seconds=0.05,
        ),
    )
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(20):
            while worker.stats.dead_lettered < 1 or worker.stats.entries_trimmed < 1:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # a few heartbeats (renewals) and reclaims more
        await worker.ownership.raise_epoch(0, 10)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def recording(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    pool = aioredis.ConnectionPool.from_url(redis_url, connection_class=RecordingConnection)
    client = aioredis.Redis(connection_pool=pool)
    _Recorder.commands = []
    yield client
    await client.aclose()
    await pool.disconnect()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_every_command_of_one_partition_touches_one_slot(
    recording: aioredis.Redis, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    layout = StreamLayout(prefix=f"{redis_prefix}events", partitions=PARTITIONS)
    await queue_life(recording, layout, worker_client=recording)
    commands = list(_Recorder.commands)
    tags = {layout.tag(p) for p in range(PARTITIONS)}
    shared = {layout.members_key.encode(), layout.dead_letter_stream.encode()}
    # The start's check for keys of the layout before the hash tags (one EXISTS each).
    shared |= {
        legacy_key(layout, kind, p).encode()
        for kind in ("stream", "unacked", "lease", "epoch", "attempts")
        for p in range(PARTITIONS)
    }
    seen_scripts: set[str] = set()
    names: set[bytes] = set()
    for command in commands:
        name = command[0].upper()
        names.add(name)
        if name == b"EVAL":
            seen_scripts.add(_sha(command[1]))
        elif name == b"EVALSHA":
            seen_scripts.add(command[1].decode())
        try:
            keys = [_as_bytes(k) for k in await redis_client.command_getkeys(*command)]
        except ResponseError:
            continue  # a command without keys (TIME, INFO, SCRIPT LOAD, CLIENT ...)
        for key in keys:
            assert key in shared or any(tag.encode() in key for tag in tags), (
                f"{key!r} ({name.decode()}) belongs to no partition's hash tag"
            )
        slots = {key_slot(key) for key in keys}
        if name in SPANNING:
            assert all(layout.partition_of_stream(key) >= 0 for key in keys)
            continue
        assert len(slots) == 1, f"{name.decode()} spans slots: {keys}"
    # Every script of the queue ran (so none escaped the check).
    scripts = {
        APPEND_SCRIPT,
        IDEMPOTENT_APPEND_SCRIPT,
        ownership_module._HEARTBEAT,
        ownership_module._ACQUIRE,
        ownership_module._RENEW,
        ownership_module._RELEASE,
        ownership_module._RAISE_EPOCH,
        ownership_module.ACK_SCRIPT,
        dead_letters._FAIL,
        backlog._SNAPSHOT,
        backlog._ADJUST,
        backlog._RESET_IF_DRAINED,
    }
    missing = {_sha(script.encode()) for script in scripts} - seen_scripts
    assert not missing, f"{len(missing)} of the queue's scripts never ran"
    for expected in (b"XCLAIM", b"XAUTOCLAIM", b"XTRIM", b"XADD", b"XPENDING", b"XRANGE"):
        assert expected in names, expected


# --- a real Redis Cluster -------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Free loopback ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A 3-master Redis Cluster on loopback (no persistence); yields one node's port."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server and redis-cli are needed to start a Redis Cluster")
    workdir = tmp_path_factory.mktemp("cluster")
    ports = _free_ports(3)
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node_dir = Path(workdir, str(port))
            node_dir.mkdir()
            nodes.append(
                subprocess.Popen(
                    [
                        server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--dir",
                        str(node_dir),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            _wait_ping(cli, port)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while (
            b"cluster_state:ok"
            not in subprocess.run(
                [cli, "-p", str(ports[0]), "cluster", "info"], capture_output=True, timeout=5
            ).stdout
        ):
            assert time.monotonic() < deadline, "the cluster did not become ready"
            time.sleep(0.1)
        yield ports[0]
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()


def _wait_ping(cli: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while (
        subprocess.run(
            [cli, "-p", str(port), "ping"], capture_output=True, timeout=5
        ).stdout.strip()
        != b"PONG"
    ):
        assert time.monotonic() < deadline, f"redis-server on port {port} did not start"
        time.sleep(0.05)


async def test_the_queues_scripts_and_commands_run_on_a_redis_cluster(cluster: int) -> None:
    client: Any = RedisCluster(host="127.0.0.1", port=cluster)
    try:
        layout = StreamLayout(prefix="cluster:events", partitions=PARTITIONS)
        slots = {key_slot(layout.stream(p).encode()) for p in range(PARTITIONS)}
        assert len(slots) == PARTITIONS  # the partitions do spread over the cluster
        await queue_life(client, layout)  # ingest's side, and the group
        owner = PartitionOwnership(client, layout, "c1", forget=lambda p: attempts_key(layout, p))
        await owner.heartbeat()
        assert await owner.acquire(range(PARTITIONS)) == list(range(PARTITIONS))
        assert await owner.raise_epoch(0, 7) == 7
        keeper = BacklogKeeper(client, layout, "c1")
        failures = FailureCounter(client, layout)
        acks = []
        for partition in range(PARTITIONS):
            await keeper.reconcile(partition)
            # One stream per read: the read across partitions is the one cross-slot command.
            reply = await client.xreadgroup(layout.group, "c1", {layout.stream(partition): ">"})
            entries = reply[0][1]
            attempts = await failures.fail(partition, entries[0][0], 1)
            assert attempts.count == 1
            await client.xautoclaim(layout.stream(partition), layout.group, "c1", 0, "0-0")
            acks.append((partition, entries))
        assert await owner.ack_many(acks) == [True] * PARTITIONS
        assert await owner.ack(0, *acks[0][1])
        for partition in range(PARTITIONS):
            await trim_partition(client, layout.stream(partition), retention_seconds=0)
            await keeper.reset_if_drained(partition)
        assert await client.xpending(layout.stream(1), layout.group) == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }
        await owner.heartbeat()  # renewals of every lease
        await owner.leave()
    finally:
        await client.aclose()
