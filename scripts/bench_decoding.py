"""What decoding requests in the guard interceptor costs on the hot paths, in µs per call.

    .venv/bin/python scripts/bench_decoding.py [--events 1000] [--rounds 5]

Before, gRPC core called the request's FromString itself; now it hands the bytes on and the
interceptor's RequestDecoder calls it. Printed: FromString alone and through the decoder (one
StoreEvents and one PublishBatch of --events events, and a small request), the interceptor's
handler lookup per call, and a request stream's cost per message with and without the decoding
wrapper. Best of --rounds, so a busy machine inflates the figures less.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from streammesh.api.common.v1 import event_pb2
from streammesh.api.ingest.v1 import ingest_pb2
from streammesh.api.storage.v1 import storage_pb2
from streammesh.mesh.decoding import DecodedRequests, LogThrottle, RequestDecoder
from streammesh.mesh.interceptors import DecodeInterceptor


class _Context:
    def peer(self) -> str:
        return "bench"


def _events(count: int) -> list[event_pb2.Event]:
    return [
        event_pb2.Event(
            id=f"00000000-0000-4000-8000-{i:012d}",
            key=f"key-{i % 64}",
            type="order.created",
            payload=b'{"total": 42, "currency": "EUR"}',
            attributes={"region": "eu-west-1"},
        )
        for i in range(count)
    ]


def _best_pair(
    rounds: int, calls: int, first: Callable[[], object], second: Callable[[], object]
) -> tuple[float, float]:
    """Best µs per call of each, the two timed in alternating rounds (so that warm-up and a
    neighbour's load fall on both alike)."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for index, run in enumerate((first, second)):
            started = time.perf_counter()
            for _ in range(calls):
                run()
            best[index] = min(best[index], (time.perf_counter() - started) / calls)
    return best[0] * 1e6, best[1] * 1e6


async def _best_async(rounds: int, run: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        await run()
        best = min(best, time.perf_counter() - started)
    return best * 1e6


def _decode_figures(events: int, rounds: int) -> None:
    throttle = LogThrottle(logging.getLogger("bench"))
    context: Any = _Context()
    batch = _events(events)
    cases = {
        f"StoreEvents ({events} events)": (
            storage_pb2.StoreEventsRequest,
            storage_pb2.StoreEventsRequest(
                batch=event_pb2.QueuedBatch(
                    events=[event_pb2.QueuedEvent(event=e, producer="bench") for e in batch]
                )
            ).SerializeToString(),
        ),
        f"PublishBatch ({events} events)": (
            ingest_pb2.PublishBatchRequest,
            ingest_pb2.PublishBatchRequest(events=batch, producer="bench").SerializeToString(),
        ),
        "CountEvents (small)": (
            storage_pb2.CountEventsRequest,
            storage_pb2.CountEventsRequest().SerializeToString(),
        ),
    }
    for name, (message, raw) in cases.items():
        decoder = RequestDecoder("/bench", message.FromString, throttle)
        calls = 200 if len(raw) > 1000 else 100_000
        alone, wrapped = _best_pair(
            rounds,
            calls,
            lambda m=message, r=raw: m.FromString(r),  # type: ignore[misc]
            lambda d=decoder, r=raw: d(r, context),  # type: ignore[misc]
        )
        print(
            f"{name:32} FromString {alone:9.2f} µs   via decoder {wrapped:9.2f} µs"
            f"   difference {wrapped - alone:+.2f} µs"
        )


async def _lookup_figure(rounds: int) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, context: None,
        request_deserializer=storage_pb2.CountEventsRequest.FromString,
        response_serializer=storage_pb2.CountEventsResponse.SerializeToString,
    )
    interceptor = DecodeInterceptor(throttle=LogThrottle(logging.getLogger("bench")))

    async def continuation(details: Any) -> Any:
        return handler

    class Details:
        method = "/streammesh.storage.v1.StorageService/CountEvents"

    details = Details()
    calls = 50_000

    async def loop() -> None:
        for _ in range(calls):
            await interceptor.intercept_service(continuation, details)

    print(f"{'handler lookup per call':32} {await _best_async(rounds, loop) / calls:9.2f} µs")


async def _stream_figure(rounds: int) -> None:
    raw = ingest_pb2.PublishRequest(sequence=1).SerializeToString()
    context: Any = _Context()
    decoder = RequestDecoder(
        "/bench", ingest_pb2.PublishRequest.FromString, LogThrottle(logging.getLogger("bench"))
    )
    messages = 50_000

    async def source() -> AsyncIterator[Any]:
        for _ in range(messages):
            yield raw

    async def plain() -> None:
        async for message in source():
            ingest_pb2.PublishRequest.FromString(message)

    async def wrapped() -> None:
        async for _ in DecodedRequests(source(), decoder, context):
            pass

    before = after = float("inf")
    for _ in range(rounds):
        before = min(before, await _best_async(1, plain) / messages)
        after = min(after, await _best_async(1, wrapped) / messages)
    print(
        f"{'request stream, per message':32} FromString {before:9.2f} µs   via decoder"
        f" {after:9.2f} µs   difference {after - before:+.2f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    _decode_figures(args.events, args.rounds)
    asyncio.run(_lookup_figure(args.rounds))
    asyncio.run(_stream_figure(args.rounds))


if __name__ == "__main__":
    main()
