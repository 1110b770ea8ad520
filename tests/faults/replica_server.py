"""A storage replica for the mesh client's network tests: the real mesh server (mTLS, health,
the peer-policy guard) serving a StorageService whose StoreEvents answers at once and names
itself in its trailing metadata: `x-test-replica` (the replica's name) and `x-test-received`
(how many StoreEvents calls it has received so far, answered in time or not).

In-process: `await start_replica(...)`. As a process of its own, to run it behind a network
namespace's link: `python -m tests.faults.replica_server NAME HOST PORT TLS_DIR TRUST_DOMAIN`
(serves until SIGTERM, then drains).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc

from streammesh.api.storage.v1 import storage_pb2, storage_pb2_grpc
from streammesh.mesh import (
    MeshServer,
    PeerPolicy,
    ServiceBinding,
    ServiceSettings,
    create_mesh_server,
)

__all__ = ["RECEIVED_KEY", "REPLICA_KEY", "SERVICE", "start_replica"]

SERVICE = storage_pb2.DESCRIPTOR.services_by_name["StorageService"]
REPLICA_KEY = "x-test-replica"
RECEIVED_KEY = "x-test-received"


class NamedStorage(storage_pb2_grpc.StorageServiceServicer):
    """StoreEvents only (the other methods answer UNIMPLEMENTED, as the generated base does)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received = 0

    async def StoreEvents(
        self, request: storage_pb2.StoreEventsRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.StoreEventsResponse:
        self.received += 1
        context.set_trailing_metadata(
            ((REPLICA_KEY, self.name), (RECEIVED_KEY, str(self.received)))
        )
        return storage_pb2.StoreEventsResponse()


async def start_replica(
    name: str, host: str, port: int, tls_dir: Path, trust_domain: str
) -> MeshServer:
    """A started replica; the processor identity may call StoreEvents."""
    policy = PeerPolicy.build(trust_domain, {f"{SERVICE.full_name}/*": ["service/processor"]})
    mesh = create_mesh_server(
        ServiceSettings(tls_dir=tls_dir, trust_domain=trust_domain, host=host, port=port),
        identity="storage",
        bindings=[
            ServiceBinding(
                SERVICE,
                storage_pb2_grpc.add_StorageServiceServicer_to_server,
                NamedStorage(name),  # type: ignore[abstract]
            )
        ],
        guard=policy,
    )
    await mesh.start()
    return mesh


async def _serve(name: str, host: str, port: int, tls_dir: Path, trust_domain: str) -> None:
    mesh = await start_replica(name, host, port, tls_dir, trust_domain)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"serving {name} on {host}:{mesh.port}", flush=True)
    await stop.wait()
    await mesh.stop(2)


if __name__ == "__main__":
    name, host, port, tls_dir, trust_domain = sys.argv[1:6]
    asyncio.run(_serve(name, host, int(port), Path(tls_dir), trust_domain))
