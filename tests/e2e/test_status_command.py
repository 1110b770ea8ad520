"""`streammesh status` on a running stack reads every replica's /metrics: calls made during its
window show as the gateway's request rate (client mistakes are not server errors), and the
processor's partitions are all owned."""

from __future__ import annotations

import asyncio
import json

import grpc

from streammesh.api.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from streammesh.cli.stack import StackConfig
from streammesh.cli.status_view import measure, render
from tests.e2e.cli import run_cli, stack_env

CALLS = 60


async def _refused_calls(stack: StackConfig, count: int) -> None:
    """`count` unary calls without a token: each answered UNAUTHENTICATED by the gateway."""
    channel = grpc.aio.secure_channel(
        stack.address("gateway"),
        grpc.ssl_channel_credentials((stack.pki_dir / "ca.pem").read_bytes()),
        options=[("grpc.ssl_target_name_override", "gateway")],
    )
    async with channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(count):
            try:
                await stub.CountEvents(gateway_pb2.CountEventsRequest(), timeout=10)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_status_measures_rates_and_partitions_from_metrics(stack: StackConfig) -> None:
    load = asyncio.create_task(asyncio.sleep(0.3))  # the window opens first
    window = asyncio.create_task(measure(stack, window=4.0))
    await load
    await _refused_calls(stack, CALLS)
    lines = {line.replica: line for line in await window}
    gateway = lines["gateway"]
    assert gateway.health == "SERVING" and gateway.metrics_url
    assert gateway.requests_per_second is not None and gateway.window_seconds is not None
    assert gateway.window_seconds >= 4.0
    # Every call made in the window (the stack's own calls may add a few).
    assert round(gateway.requests_per_second * gateway.window_seconds) >= CALLS
    assert gateway.error_ratio == 0.0  # UNAUTHENTICATED is the caller's, not a server fault
    assert gateway.p99_ms is not None and gateway.p99_ms > 0
    assert lines["processor"].partitions_owned == stack.partitions
    assert lines["processor"].lag is not None
    table = render(list(lines.values()))
    assert table.splitlines()[0].split()[:4] == ["replica", "pid", "port", "health"]


async def test_status_json_has_every_replica(stack: StackConfig) -> None:
    code, out, err = await run_cli(stack_env(stack), "status", "--json", "--window", "0.5")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert {r["replica"] for r in records} == {"storage", "auth", "ingest", "processor", "gateway"}
    assert all(r["health"] == "SERVING" and r["metrics_url"] for r in records)
    processor = next(r for r in records if r["replica"] == "processor")
    assert processor["partitions_owned"] == stack.partitions
