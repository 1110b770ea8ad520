"""The processor's view of storage's engine calls: LoadEngineCheckpoint on takeover and
StoreEngineOutputs per batch (both idempotent, so retried by the mesh client), with failures
sorted as for StoreEvents: outages (`StoreUnavailable`: wait and send the same again) and a
stale lease epoch (`Fenced`: another processor owns the partition now; drop it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from services.processor.delivery.dead_letters import StoreUnavailable, is_outage
from streammesh.api.storage.v1 import definitions_pb2 as pb
from streammesh.api.storage.v1 import definitions_pb2_grpc as pb_grpc

__all__ = ["EngineStorage", "Fenced"]

if TYPE_CHECKING:
    DefinitionStub = pb_grpc.DefinitionServiceAsyncStub
else:
    DefinitionStub = pb_grpc.DefinitionServiceStub


class Fenced(Exception):
    """Storage refused a write or load for a lease epoch below its fence: the partition has a
    newer owner, and nothing was written."""


class EngineStorage:
    """LoadEngineCheckpoint and StoreEngineOutputs over a channel to storage (the processor's
    `storage_client`'s)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub: DefinitionStub = DefinitionStub(channel)

    async def load(
        self, stream: str, partition: int, lease_epoch: int
    ) -> pb.EngineCheckpoint | None:
        """The partition's checkpoint (None when none was saved), after raising its fence to
        `lease_epoch` (0: read without fencing). Fenced when the stored epoch is higher."""
        with _sorted_failures():
            reply = await self._stub.LoadEngineCheckpoint(
                pb.LoadEngineCheckpointRequest(
                    stream=stream, partition=partition, lease_epoch=lease_epoch
                )
            )
        return reply.checkpoint if reply.found else None

    async def store(self, request: pb.StoreEngineOutputsRequest) -> pb.StoreEngineOutputsResponse:
        """Store outputs (and the checkpoint) in one transaction; Fenced for a stale epoch."""
        with _sorted_failures():
            reply: pb.StoreEngineOutputsResponse = await self._stub.StoreEngineOutputs(request)
        return reply


@contextlib.contextmanager
def _sorted_failures() -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as error:
        text = f"{error.code().name}: {error.details()}"
        if is_outage(error):
            raise StoreUnavailable(text) from error
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            raise Fenced(text) from error
        raise
