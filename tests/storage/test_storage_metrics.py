"""Storage's pipeline counters, read from the server's own registry: events stored and
duplicates per StoreEvents batch, dead letters once per entry."""

from __future__ import annotations

import grpc
import pytest

from streammesh.mesh import MeshServer
from tests.storage.conftest import Stub, queued
from tests.storage.test_dead_letters import dead_letter
from tests.storage.test_storage import store_request


def counter(server: MeshServer, name: str) -> float:
    return server.metrics.registry.get_sample_value(name) or 0.0


async def test_stored_and_duplicate_events_are_counted_per_batch(
    server: MeshServer, processor: Stub
) -> None:
    batch = [queued(f"k{i % 3}") for i in range(20)]
    await processor.StoreEvents(store_request(batch), timeout=5)
    await processor.StoreEvents(store_request([*batch[:5], queued("new")]), timeout=5)
    assert counter(server, "streammesh_storage_events_stored_total") == 21
    assert counter(server, "streammesh_storage_events_duplicate_total") == 5
    ok = {
        "grpc_type": "unary",
        "grpc_service": "streammesh.storage.v1.StorageService",
        "grpc_method": "StoreEvents",
        "grpc_code": "OK",
    }
    assert server.metrics.registry.get_sample_value("grpc_server_handled_total", ok) == 2


async def test_a_dead_letter_is_counted_once(server: MeshServer, processor: Stub) -> None:
    request = dead_letter("7-1")
    first = await processor.StoreDeadLetter(request, timeout=5)
    again = await processor.StoreDeadLetter(request, timeout=5)
    assert first.created and not again.created
    assert counter(server, "streammesh_storage_dead_letters_total") == 1


async def test_a_call_the_peer_policy_refuses_is_counted_by_method_and_caller(
    server: MeshServer, gateway: Stub
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.StoreEvents(store_request([queued("k")]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    denied = {
        "method": "/streammesh.storage.v1.StorageService/StoreEvents",
        "caller": "service/gateway",
        "reason": "PEER_NOT_ALLOWED",
    }
    registry = server.metrics.registry
    assert registry.get_sample_value("streammesh_policy_denials_total", denied) == 1
    assert counter(server, "streammesh_storage_events_stored_total") == 0
