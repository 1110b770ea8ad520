"""ProcessorServicer: what this worker is doing, for operators."""

from __future__ import annotations

import grpc

from services.processor.worker import StreamWorker
from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc

__all__ = ["ProcessorServicer"]


class ProcessorServicer(processor_pb2_grpc.ProcessorServiceServicer):
    def __init__(self, worker: StreamWorker, group: str) -> None:
        self._worker = worker
        self._group = group

    async def GetStatus(
        self, request: processor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> processor_pb2.GetStatusResponse:
        stats = self._worker.stats
        return processor_pb2.GetStatusResponse(
            consumer=self._worker.consumer,
            group=self._group,
            partitions=await self._worker.partition_status(),
            batches_stored=stats.batches_stored,
            events_stored=stats.events_stored,
            events_duplicate=stats.events_duplicate,
            store_failures=stats.store_failures,
            dead_lettered=stats.dead_lettered,
            counted_failures=stats.counted_failures,
        )
