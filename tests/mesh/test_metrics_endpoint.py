"""/metrics over HTTP: what a scrape of a running server shows (gRPC families, build info, the
certificate's expiry, process metrics), a port already taken, and the stack's ports."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streammesh.cli.stack import START_ORDER, StackConfig
from streammesh.mesh.metrics.registry import build_version
from tests.mesh.arity import SERVICE, arity_server, call, channel_to


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_a_scrape_shows_calls_build_info_and_certificate_expiry(pki_dir: Path) -> None:
    port = free_port()
    mesh = arity_server(pki_dir, metrics_port=port)
    await mesh.start()
    try:
        assert mesh.metrics_endpoint is not None and mesh.metrics_endpoint.port == port
        async with channel_to(mesh, pki_dir) as channel:
            for _ in range(3):
                await call(channel, "UnaryUnary")
        await asyncio.sleep(0.05)
        samples = await scrape(port)
    finally:
        await mesh.stop(0)
    labels = (("grpc_method", "UnaryUnary"), ("grpc_service", SERVICE), ("grpc_type", "unary"))
    assert samples[("grpc_server_started_total", labels)] == 3
    assert samples[("grpc_server_handled_total", (("grpc_code", "OK"), *labels))] == 3
    assert samples[("streammesh_build_info", (("version", build_version()),))] == 1
    expiry = samples[
        ("streammesh_tls_certificate_expiry_timestamp_seconds", (("identity", "processor"),))
    ]
    assert expiry > time.time()
    assert samples[("process_cpu_seconds_total", ())] > 0
    assert mesh.metrics_endpoint.port is None  # stopped with the server


async def test_a_taken_port_costs_the_endpoint_not_the_service(
    pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        mesh = arity_server(pki_dir, metrics_port=taken)
        with caplog.at_level(logging.WARNING):
            await mesh.start()
        try:
            async with channel_to(mesh, pki_dir) as channel:
                assert await call(channel, "UnaryUnary") == ["a"]
        finally:
            await mesh.stop(0)
    assert mesh.metrics_endpoint is not None and mesh.metrics_endpoint.port is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"cannot listen on 127.0.0.1:{taken}" in w and "METRICS_PORT" in w for w in warnings)


def test_without_a_port_there_is_no_endpoint(pki_dir: Path) -> None:
    assert arity_server(pki_dir).metrics_endpoint is None


async def test_metrics_disabled_means_no_layer_and_no_endpoint(pki_dir: Path) -> None:
    # What `streammesh bench --variants metrics` runs the stack with: calls are not counted.
    started = {}
    for enabled in (True, False):
        mesh = arity_server(pki_dir, metrics_port=free_port(), metrics_enabled=enabled)
        assert (mesh.metrics_endpoint is not None) is enabled
        await mesh.start()
        try:
            async with channel_to(mesh, pki_dir) as channel:
                assert await call(channel, "UnaryUnary") == ["a"]
        finally:
            await mesh.stop(0)
        started[enabled] = sum(
            sample.value
            for family in mesh.metrics.registry.collect()
            for sample in family.samples
            if sample.name == "grpc_server_started_total"
        )
    assert started == {True: 1, False: 0}


def test_the_stack_gives_each_service_a_metrics_port_of_its_own() -> None:
    config = StackConfig()
    ports = [config.metrics_port(name) for name in START_ORDER]
    assert len(set(ports)) == len(START_ORDER)
    assert not set(ports) & {config.port(name) for name in START_ORDER}
    for name in START_ORDER:
        env = config.service_env(name)
        prefix = f"STREAMMESH_{name.upper()}_"
        assert env[prefix + "METRICS_PORT"] == str(config.metrics_port(name))
        assert env[prefix + "METRICS_HOST"] == "127.0.0.1"
    off = config.model_copy(update={"ingest_metrics_port": 0})
    assert off.service_env("ingest")["STREAMMESH_INGEST_METRICS_PORT"] == "0"
