"""What gRPC's own outlier detection does with a few replicas (the experiment behind
streammesh.mesh.ejection): `outlier_detection_experimental` in the service config, over real
mTLS sockets, three replicas of which one always fails.

Findings on grpcio 1.85: the policy is registered and accepted through the service config; with
its defaults (minimumHosts 5) it never ejects one of three replicas; with minimumHosts and
requestVolume lowered it does eject; and it counts an application error (INVALID_ARGUMENT) as
a failure like UNAVAILABLE, so it would eject a healthy replica for its clients' bad requests.
That last point is why the mesh client ejects with its own status-aware Ejector instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.mesh.channel import channel_options
from streammesh.mesh.client import TlsFiles
from streammesh.mesh.errors import InvalidArgument, Unavailable
from tests.test_mesh_client import flaky_storage, start_storage

FAILURE_PERCENTAGE = {
    "threshold": 50,
    "enforcementPercentage": 100,
    "minimumHosts": 2,
    "requestVolume": 5,
}


def outlier_config(**ejection: Any) -> dict[str, Any]:
    return {
        "loadBalancingConfig": [
            {
                "outlier_detection_experimental": {
                    "interval": "0.1s",
                    "baseEjectionTime": "30s",
                    "maxEjectionPercent": 100,
                    "childPolicy": [{"round_robin": {}}],
                    **ejection,
                }
            }
        ]
    }


async def calls_reaching_the_failing_replica(
    pki_dir: Path, config: dict[str, Any], error: Callable[[str], Exception]
) -> int:
    """Send 180 calls over 1.5 s (the policy's interval is 0.1 s), then 30 more: how many of
    the last 30 reached the replica that fails every call with `error`."""
    servicers = [flaky_storage(0), flaky_storage(0), flaky_storage(10**9, error)]
    meshes = [await start_storage(pki_dir, servicer) for servicer in servicers]
    target = "ipv4:" + ",".join(f"127.0.0.1:{mesh.port}" for mesh in meshes)
    channel = grpc.aio.secure_channel(
        target,
        TlsFiles.of(pki_dir, "processor").credentials(),
        options=channel_options("storage", config, max_message_bytes=1 << 20),
    )
    stub = storage_pb2_grpc.StorageServiceStub(channel)

    async def send(count: int) -> None:
        for _ in range(count):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.StoreEvents(storage_pb2.StoreEventsRequest(), timeout=2)

    try:
        for _ in range(6):
            await send(30)
            await asyncio.sleep(0.25)
        before = servicers[2].attempts["StoreEvents"]
        await send(30)
        return servicers[2].attempts["StoreEvents"] - before
    finally:
        await channel.close()
        for mesh in meshes:
            await mesh.stop(0)


async def test_defaults_never_eject_one_of_three(pki_dir: Path) -> None:
    config = outlier_config(successRateEjection={}, failurePercentageEjection={})
    assert await calls_reaching_the_failing_replica(pki_dir, config, Unavailable) == 10


async def test_lowered_minimum_hosts_ejects_an_unavailable_replica(pki_dir: Path) -> None:
    config = outlier_config(failurePercentageEjection=FAILURE_PERCENTAGE)
    assert await calls_reaching_the_failing_replica(pki_dir, config, Unavailable) == 0


async def test_it_ejects_a_replica_for_application_errors_too(pki_dir: Path) -> None:
    # INVALID_ARGUMENT is the client's mistake, yet the replica answering it is ejected.
    config = outlier_config(failurePercentageEjection=FAILURE_PERCENTAGE)
    assert await calls_reaching_the_failing_replica(pki_dir, config, InvalidArgument) == 0
