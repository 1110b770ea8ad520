"""What tracing costs per unary call, in µs.

1. In process, CPU time (process_time, so the export thread's work counts and a loaded
   machine's waiting does not): the server layer's enter+leave and the client interceptor
   around a call that is already done, unsampled and sampled (spans batched to a JSON-lines
   file, as the file exporter does, and their export counted). With tracing off neither is installed: the cost is 0.
2. Over loopback mTLS: sequential calls to a real mesh server through a mesh channel, with
   tracing off (no layer, no client interceptors: what a service runs with
   tracing_exporter=none), and on (server layer plus client interceptors) with 1% and 100%
   sampling. Rounds alternate so that a busy moment of the machine costs each the same; best
   round and median (wall time: noisy on a shared machine).

    .venv/bin/python scripts/bench_tracing.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

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
from streammesh.mesh.interceptors.tracing import ServerTracingInterceptor
from streammesh.mesh.metrics import ServiceMetrics
from streammesh.mesh.server import standard_interceptors
from streammesh.mesh.tracing_client import tracing_interceptors

METHOD = "/streammesh.processor.v1.ProcessorService/GetStatus"


class _Status(processor_pb2_grpc.ProcessorServiceServicer):
    async def GetStatus(
        self, request: processor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> processor_pb2.GetStatusResponse:
        return processor_pb2.GetStatusResponse(consumer="bench")


def _provider(ratio: float, out: Any, queue: int = 2048) -> TracerProvider:
    """As streammesh.mesh.tracing.configure_tracing builds it for the file exporter (`queue`:
    the batch's bound, raised in process so that no span is dropped uncounted)."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": "bench"}),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
    exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(None) + "\n")
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=queue))
    return provider


class _Context:
    """What the server layer asks of a call's context, answered at once."""

    def __init__(self, flags: str) -> None:
        self._metadata = (("traceparent", f"00-{'ab' * 16}-{'cd' * 8}-{flags}"),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def time_remaining(self) -> float:
        return 10.0


class _Done:
    """A call that is over, OK."""

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    def add_done_callback(self, callback: Any) -> None:
        callback(self)


class _Details:
    method = METHOD.encode()
    timeout = 5.0
    metadata = None
    credentials = None
    wait_for_ready = None


async def _done_call(details: Any, request: Any) -> _Done:
    return _Done()


def _cpu_per_call(run: Any, calls: int, rounds: int, provider: TracerProvider) -> float:
    """CPU per call, the export of the spans it made included (flushed within the timing)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        asyncio.run(run(calls))
        provider.force_flush()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


def _one_sampling(label: str, ratio: float, flags: str, out: Any, calls: int, rounds: int) -> None:
    from streammesh.mesh.interceptors.base import Rpc
    from streammesh.mesh.interceptors.tracing import _ServerTracingLayer
    from streammesh.mesh.tracing_client import UnaryUnaryTracingInterceptor

    rpc = Rpc(METHOD, "streammesh.processor.v1.ProcessorService", "GetStatus", False, False)
    provider = _provider(ratio, out, queue=calls * rounds * 2)
    tracer = provider.get_tracer("bench")
    layer = _ServerTracingLayer(rpc, tracer)
    context: Any = _Context(flags)
    interceptor = UnaryUnaryTracingInterceptor(tracer)

    # Each run in a fresh asyncio.run: a context the layer attached stays with its task.
    async def server(n: int) -> None:
        for _ in range(n):
            _, span = await layer.enter(None, context)
            await layer.leave(span, context, None)

    async def client(n: int) -> None:  # root spans: 1% of them sampled, or all
        for _ in range(n):
            await interceptor.intercept_unary_unary(_done_call, _Details(), None)
        await asyncio.sleep(0)  # the spans end in tasks of their own: let them run

    print(f"  server layer, {label:9} {_cpu_per_call(server, calls, rounds, provider):6.1f}")
    print(f"  client, {label:15} {_cpu_per_call(client, calls, rounds, provider):6.1f}")
    provider.shutdown()


def in_process(calls: int, rounds: int) -> None:
    print(f"in process, CPU µs per call ({calls} calls, best of {rounds})")
    with tempfile.TemporaryFile("w+") as out:
        for label, ratio, flags in (("unsampled", 0.01, "00"), ("sampled", 1.0, "01")):
            _one_sampling(label, ratio, flags, out, calls, rounds)


async def main(calls: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        pki = Path(tmp)
        init_pki(pki, trust_domain="bench.local")
        settings = ServiceSettings(tls_dir=pki, trust_domain="bench.local")
        policy = PeerPolicy.build("bench.local", {METHOD.lstrip("/"): ["service/gateway"]})
        binding = ServiceBinding(
            processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
            processor_pb2_grpc.add_ProcessorServiceServicer_to_server,
            _Status(),
        )
        spans_out = (pki / "spans.jsonl").open("a")
        providers = {"on, 1%": _provider(0.01, spans_out), "on, 100%": _provider(1.0, spans_out)}
        servers, channels = {}, {}
        for name in ("off", *providers):
            metrics = ServiceMetrics("processor")
            layers = standard_interceptors(settings, guard=policy, metrics=metrics)
            client: list[grpc.aio.ClientInterceptor] = []
            if name in providers:
                tracer = providers[name].get_tracer("bench")
                layers.insert(0, ServerTracingInterceptor(tracer))
                client = tracing_interceptors(tracer)
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
            channels[name] = create_channel(
                f"127.0.0.1:{mesh.port}",
                TlsMaterial.load(pki, "gateway"),
                server_name="processor",
                config={"methodConfig": []},
                interceptors=client,
            )
        stubs = {n: processor_pb2_grpc.ProcessorServiceStub(c) for n, c in channels.items()}
        samples: dict[str, list[float]] = {name: [] for name in stubs}
        try:
            for stub in stubs.values():  # connect and warm up
                for _ in range(200):
                    await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
            for _ in range(rounds):
                for name, stub in stubs.items():
                    started = time.perf_counter()
                    for _ in range(calls):
                        await stub.GetStatus(processor_pb2.GetStatusRequest(), timeout=5)
                    samples[name].append((time.perf_counter() - started) / calls * 1e6)
        finally:
            for channel in channels.values():
                await channel.close()
            for mesh in servers.values():
                await mesh.stop(0)
            for provider in providers.values():
                provider.shutdown()
            spans_out.close()
    base = min(samples["off"])
    print(f"sequential unary calls over loopback mTLS ({calls} per round, {rounds} rounds)")
    for name, values in samples.items():
        best = min(values)
        print(
            f"  tracing {name:9} best {best:7.1f} µs/call  median "
            f"{statistics.median(values):7.1f}  (+{best - base:5.1f} µs vs off)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    in_process(args.calls * 5, args.rounds)
    asyncio.run(main(args.calls, args.rounds))
