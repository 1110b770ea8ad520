"""What the server's interceptor layers cost per unary call, in µs.

1. In process, no network: a unary handler called through the layers as gRPC would call it
   (the chain of intercept_service, then the behaviour), with only the decoding layer every
   server needs, with the standard list minus metrics, and with the full standard list. The
   differences are each layer's own cost.
2. Over loopback mTLS: sequential unary calls to a real mesh server, with and without the
   metrics layer, rounds alternated; best round of each (the call itself dominates).

    .venv/bin/python scripts/bench_interceptors.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from streammesh.api.processor.v1 import processor_pb2, processor_pb2_grpc
from streammesh.mesh import (
    PeerPolicy,
    ServiceBinding,
    ServiceSettings,
    TlsMaterial,
    create_channel,
    create_mesh_server,
    init_pki,
)
from streammesh.mesh.interceptors import (
    DeadlineInterceptor,
    DecodeInterceptor,
    ErrorInterceptor,
    GuardInterceptor,
)
from streammesh.mesh.logs import LogThrottle
from streammesh.mesh.metrics import ServerMetricsInterceptor, ServiceMetrics

METHOD = "/streammesh.processor.v1.ProcessorService/GetStatus"
REQUEST = processor_pb2.GetStatusRequest().SerializeToString()


class _Context:
    """What the layers ask of a call's context, answered at once."""

    def time_remaining(self) -> float:
        return 10.0

    def code(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def _allow(method: str, context: Any) -> None:
    return None


def _chain(interceptors: Sequence[Any]) -> Callable[[], Any]:
    """intercept_service of each interceptor around the next, as grpc.aio chains them."""
    handler = grpc.unary_unary_rpc_method_handler(
        _respond,
        request_deserializer=processor_pb2.GetStatusRequest.FromString,
        response_serializer=processor_pb2.GetStatusResponse.SerializeToString,
    )

    class Details:
        method = METHOD

    async def resolve() -> Any:
        async def last(details: Any) -> Any:
            return handler

        continuation = last
        for interceptor in reversed(interceptors):

            def bind(i: Any = interceptor, nxt: Any = continuation) -> Any:
                async def step(details: Any) -> Any:
                    return await i.intercept_service(nxt, details)

                return step

            continuation = bind()
        return await continuation(Details())

    return resolve


async def _respond(request: Any, context: Any) -> processor_pb2.GetStatusResponse:
    return processor_pb2.GetStatusResponse(consumer="bench")


def _lists() -> dict[str, list[Any]]:
    throttle = LogThrottle(logging.getLogger("bench"))
    metrics = ServiceMetrics("bench")
    decode = DecodeInterceptor(throttle=throttle)
    without = [ErrorInterceptor(), DeadlineInterceptor(30), GuardInterceptor(_allow), decode]
    return {
        "decoding only": [decode],
        "errors+deadline+guard+decoding": without,
        "standard (+ metrics)": [ServerMetricsInterceptor(metrics.grpc_server), *without],
    }


async def in_process(calls: int, rounds: int) -> dict[str, float]:
    """Rounds alternate between the lists, so that a busy moment of the machine costs each the
    same; the best round of each counts."""
    context: Any = _Context()
    resolvers = {name: _chain(interceptors) for name, interceptors in _lists().items()}
    samples: dict[str, list[float]] = {name: [] for name in resolvers}
    for _ in range(rounds):
        for name, resolve in resolvers.items():
            started = time.perf_counter()
            for _ in range(calls):
                handler = await resolve()
                await handler.unary_unary(REQUEST, context)
            samples[name].append((time.perf_counter() - started) / calls * 1e6)
    return {name: min(values) for name, values in samples.items()}


class _Status(processor_pb2_grpc.ProcessorServiceServicer):
    async def GetStatus(
        self, request: processor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> processor_pb2.GetStatusResponse:
        return processor_pb2.GetStatusResponse(consumer="bench")


async def over_mtls(calls: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-interceptors-") as tmp:
        pki = Path(tmp)
        init_pki(pki, trust_domain="bench.local")
        settings = ServiceSettings(tls_dir=pki, trust_domain="bench.local")
        policy = PeerPolicy.build("bench.local", {METHOD.lstrip("/"): ["service/gateway"]})
        binding = ServiceBinding(
            processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
            processor_pb2_grpc.add_ProcessorServiceServicer_to_server,
            _Status(),
        )
        servers = {}
        for name, with_metrics in (("without metrics", False), ("with metrics", True)):
            metrics = ServiceMetrics("processor")
            layers: list[Any] = [
                ErrorInterceptor(),
                DeadlineInterceptor(30),
                GuardInterceptor(policy),
            ]
            if with_metrics:
                layers.insert(0, ServerMetricsInterceptor(metrics.grpc_server))
            mesh = create_mesh_server(
                settings,
                identity="processor",
                bindings=[binding],
                guard=None,
                metrics=metrics,
                interceptors=layers,
            )
            await mesh.start()
            servers[name] = mesh
        samples: dict[str, list[float]] = {name: [] for name in servers}
        try:
            channels = {
                name: create_channel(
                    f"127.0.0.1:{mesh.port}",
                    TlsMaterial.load(pki, "gateway"),
                    server_name="processor",
                    config={"methodConfig": []},
                )
                for name, mesh in servers.items()
            }
            stubs = {n: processor_pb2_grpc.ProcessorServiceStub(c) for n, c in channels.items()}
            for stub in stubs.values():  # connect and warm up
                for _ in range(200):
                    await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
            for _ in range(rounds):
                for name, stub in stubs.items():
                    started = time.perf_counter()
                    for _ in range(calls):
                        await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
                    samples[name].append((time.perf_counter() - started) / calls * 1e6)
            for channel in channels.values():
                await channel.close()
        finally:
            for mesh in servers.values():
                await mesh.stop(0)
    for name, values in samples.items():
        print(
            f"  {name:18} best {min(values):7.1f} µs/call   median {statistics.median(values):7.1f}"
        )
    return {name: min(values) for name, values in samples.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print("in process (no network), µs per unary call, best round:")
    figures = await in_process(args.calls * 3, args.rounds * 3)
    base = figures["decoding only"]
    for name, value in figures.items():
        print(f"  {name:32} {value:6.2f} µs   (+{value - base:5.2f} over decoding only)")
    layers = figures["errors+deadline+guard+decoding"]
    print(f"  the metrics layer alone: +{figures['standard (+ metrics)'] - layers:.2f} µs per call")
    print("over loopback mTLS, sequential unary calls (client in the same process):")
    real = await over_mtls(args.calls, args.rounds)
    difference = real["with metrics"] - real["without metrics"]
    print(
        f"  metrics layer: {difference:+.1f} µs per call "
        f"({difference / real['without metrics'] * 100:+.1f}%)"
    )


if __name__ == "__main__":
    asyncio.run(main())
