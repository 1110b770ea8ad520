"""A real Prometheus scrapes all five services of a running stack while `streammesh demo` drives
events through it: the pipeline's counters (acknowledged, stored by storage and by the processor),
the processor's partitions and lag, and the gRPC rates read back through Prometheus's HTTP API
match what was driven; every query of the shipped Grafana dashboard evaluates there."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from streammesh.cli.stack import START_ORDER, StackConfig
from tests.e2e.cli import stack_env
from tests.mesh.test_grafana_dashboard import generator
from tests.mesh.test_prometheus import Prometheus, needs_prometheus

pytestmark = [needs_prometheus, pytest.mark.slow]

EVENTS = 3000


def _demo(stack: StackConfig) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "streammesh.cli.main",
            "demo",
            "--events",
            str(EVENTS),
            "--batch-size",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=stack_env(stack),
        check=False,
    )


async def _total(prometheus: Prometheus, metric: str) -> float:
    value = await prometheus.scalar(f'sum({metric}{{job="streammesh"}})')
    return value or 0.0


async def test_prometheus_sees_the_pipeline_of_a_running_stack(
    stack: StackConfig, tmp_path: Path
) -> None:
    targets = {name: f"127.0.0.1:{stack.metrics_port(name)}" for name in START_ORDER}
    prometheus = Prometheus(tmp_path, targets)
    await prometheus.start()
    try:
        await prometheus.until(
            lambda: prometheus.scalar('count(up{job="streammesh"} == 1) == 5'), "5 targets up"
        )
        counters = (
            "streammesh_ingest_events_accepted_total",
            "streammesh_storage_events_stored_total",
            "streammesh_processor_events_stored_total",
        )
        before = {metric: await _total(prometheus, metric) for metric in counters}
        demo = await asyncio.to_thread(_demo, stack)
        assert demo.returncode == 0, demo.stderr + demo.stdout

        async def all_counted() -> bool:
            now = [await _total(prometheus, m) - before[m] for m in counters]
            return min(now) >= EVENTS and len(set(now)) == 1

        await prometheus.until(all_counted, f"{EVENTS} events acknowledged and stored")
        # The demo's events and its processing part's payments: all acknowledged, all stored
        # once (the stack is this test's alone while it runs; the demo's ids are new).
        risen = {m: await _total(prometheus, m) - before[m] for m in counters}
        assert len(set(risen.values())) == 1 and min(risen.values()) >= EVENTS, risen
        owned = await prometheus.scalar("sum(streammesh_processor_partitions_owned)")
        assert owned == stack.partitions
        lag = await prometheus.query("streammesh_processor_partition_lag")
        assert {sample["metric"]["partition"] for sample in lag} == {
            str(n) for n in range(stack.partitions)
        }
        stored_rate = await prometheus.scalar(
            "sum(rate(streammesh_storage_events_stored_total[1m]))"
        )
        assert stored_rate is not None and stored_rate > 0
        publish = await prometheus.scalar(
            'sum(grpc_server_handled_total{service="gateway",grpc_method="Publish"})'
        )
        assert publish is not None and publish >= 1
        # Every dashboard query evaluates in this Prometheus (syntax and label use alike).
        for query in generator().queries():
            await prometheus.query(
                query.replace("$__rate_interval", "1m").replace("$job", "streammesh")
            )
    finally:
        await prometheus.stop()
