"""Scenario: one of two processors cut off by a network partition under load, then the link
comes back.

Setup: the stack's processor runs on loopback; a second one runs inside a network namespace of
the test's own (tests/netns.py) and reaches the stack's Redis and storage only over the
namespace's veth pair. Both of those listen on 127.0.0.1, which no other namespace can reach,
so two userspace forwarders (tests/tcp_proxy.py, in the test process) listen on the root end
of the veth and pass the bytes on over loopback. `cut()` makes the link lose everything,
silently (the cut processor's sockets see no error, only silence); the forwarders stay up.

Proves: the cut processor's leases expire and the other processor takes every partition within
the lease time (printed: the takeover time); once the link is back the cut processor rejoins;
every acknowledged event is stored exactly once and in per-key order, whatever the cut
processor had in flight when the link went (held by TCP, delivered once it is back).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis

from streammesh.cli.stack import check_health
from tests.faults.harness import TUNING, FaultStack
from tests.faults.invariant import check_invariant
from tests.faults.load import Metadata
from tests.faults.test_rebalance import _wait_leases
from tests.netns import NetNamespace, network_namespace
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PORT = 50061  # the namespace has its own ports: nothing else listens there
LEASE_SECONDS = int(TUNING["processor"]["STREAMMESH_PROCESSOR_LEASE_TTL_MS"]) / 1000


def _processor_env(
    stack: FaultStack, namespace: NetNamespace, consumer: str, redis: TcpProxy, storage: TcpProxy
) -> dict[str, str]:
    """The stack's processor settings, but listening in the namespace and reaching Redis and
    storage through the forwarders on the root end of the veth."""
    url = urlsplit(stack.config.redis_url)
    redis_url = urlunsplit(url._replace(netloc=f"{namespace.host_address}:{redis.port}"))
    return {
        **os.environ,
        **stack.config.service_env("processor"),
        **TUNING["processor"],
        "STREAMMESH_PROCESSOR_HOST": namespace.address,
        "STREAMMESH_PROCESSOR_PORT": str(PORT),
        "STREAMMESH_PROCESSOR_CONSUMER": consumer,
        "STREAMMESH_PROCESSOR_REDIS_URL": redis_url,
        "STREAMMESH_PROCESSOR_STORAGE_TARGET": f"{namespace.host_address}:{storage.port}",
    }


async def _wait_serving(stack: FaultStack, address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while await check_health(stack.config, "processor", timeout=1.0, address=address) != "SERVING":
        assert time.monotonic() < deadline, (
            f"the processor in the namespace is not SERVING: {address}"
        )
        await asyncio.sleep(0.2)


async def test_a_processor_cut_off_by_a_partition_loses_its_partitions_within_the_lease(
    stack: FaultStack, redis_client: aioredis.Redis, producer: Metadata
) -> None:
    first = (await stack.processor_status()).consumer
    second = f"faults-netns-{uuid.uuid4().hex[:6]}"
    redis = urlsplit(stack.config.redis_url)
    with network_namespace() as namespace:
        forwarders = [
            TcpProxy(str(redis.hostname), redis.port or 6379, host=namespace.host_address),
            TcpProxy("127.0.0.1", stack.config.port("storage"), host=namespace.host_address),
        ]
        for forwarder in forwarders:
            await forwarder.start()
        load = stack.load(producer)
        running: asyncio.Task[object] | None = None
        try:
            namespace.spawn(
                [sys.executable, "-m", "services.processor"],
                env=_processor_env(stack, namespace, second, *forwarders),
                log=stack.log_file("processor-netns"),
            )
            address = f"{namespace.address}:{PORT}"
            await _wait_serving(stack, address, 30)
            await _wait_leases(redis_client, stack, {first, second}, 15)

            running = asyncio.create_task(load.run(duration=7.0))
            await asyncio.wait_for(load.acked_batches.wait(), 10)
            await asyncio.sleep(1.5)
            namespace.cut()
            alone, takeover_seconds = await _wait_leases(redis_client, stack, {first}, 15)
            await asyncio.sleep(1.0)  # the partition outlasts the takeover
            namespace.heal()
            back, rejoin_seconds = await _wait_leases(redis_client, stack, {first, second}, 20)
            report = await running
            result = await check_invariant(stack.config, report, redis_client)
            status = await stack.processor_status(address)
        finally:
            load.stop()
            if running is not None:
                await asyncio.gather(running, return_exceptions=True)
            namespace.stop_processes()  # before its forwarders go: no errors of our making
            for forwarder in forwarders:
                await forwarder.close()
    print(
        f"\n[netns partition; shared machine] lease {LEASE_SECONDS:.1f}s: all "
        f"{alone.count(first)} partitions on {first} {takeover_seconds:.2f}s after the cut; "
        f"the cut processor rejoined ({back.count(second)} partitions) {rejoin_seconds:.2f}s "
        f"after the link was back; it stored {status.events_stored} events "
        f"({status.events_duplicate} duplicates skipped); load {report.summary()}; "
        f"invariant {result.summary()}"
    )
    assert takeover_seconds < 3 * LEASE_SECONDS + 2, "the takeover took far past the lease"
