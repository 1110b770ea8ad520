"""`streammesh bench --replicas` and `--compare-replicas`: CPU per service summing its replicas
and per replica (fast), the comparison's arithmetic and lines (fast), and one tiny run with two
storage replicas whose comparison restarts the stack with two gateways (slow)."""

from __future__ import annotations

import argparse
import json
import math
import uuid
from pathlib import Path
from typing import Any

import pytest

from streammesh.cli import bench_load as load
from streammesh.cli.bench import add_bench_command, cmd_bench
from streammesh.cli.bench_mesh_cost import mesh_cost_problems, mesh_costs, render_mesh_cost
from streammesh.cli.bench_replicas import per_replica_cpu, replicated
from streammesh.cli.processes import process_alive
from tests.bench.configs import bench_test_config


def _sample(services: dict[str, float | None], machine: float) -> load.CpuSample:
    return load.CpuSample(services=services, loadgen=0.0, redis=0.0, postgres=0.0, machine=machine)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    return parser


def test_a_services_cpu_sums_its_replicas_and_each_replica_is_kept() -> None:
    before = _sample({"gateway": 1.0, "storage": 2.0, "storage@2": 3.0}, machine=10.0)
    after = _sample({"gateway": 1.5, "storage": 2.25, "storage@2": 3.5}, machine=12.0)
    cpu = load.cpu_per_event(before, after, 1000)
    assert cpu["gateway"] == pytest.approx(500)
    assert cpu["storage"] == pytest.approx(750)  # 0.25 s + 0.5 s over 1000 events
    assert "storage@2" not in cpu
    assert cpu["total"] == pytest.approx(1250)  # the replicas counted once, in their service
    by_replica = per_replica_cpu(before, after, 1000)
    assert by_replica is not None
    assert by_replica == pytest.approx({"storage@1": 250, "storage@2": 500})
    assert replicated(before.services) == ["storage"]
    # The default stack: one process each, no per-replica figures.
    single = _sample({"gateway": 1.0, "storage": 2.0}, machine=1.0)
    assert per_replica_cpu(single, single, 10) is None
    # A replica that vanished makes its service's figure unknown, not smaller.
    gone = _sample({"gateway": 1.5, "storage": 2.25, "storage@2": None}, machine=12.0)
    assert load.cpu_per_event(before, gone, 1000)["storage"] is None


def test_replica_flags_take_the_syntax_of_up_and_default_to_none() -> None:
    parser = _parser()
    default = parser.parse_args(["bench"])
    assert default.replicas is None and default.compare_replicas is None
    args = parser.parse_args(["bench", "--replicas", "gateway=2,storage=2"])
    assert args.replicas == {"gateway": 2, "ingest": 1, "processor": 1, "storage": 2, "auth": 1}
    for bad in ("storage", "cache=2", "storage=0", "storage=2,storage=3"):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--compare-replicas", bad])


def _loop(
    stored_eps: float, machine: float, path: float, replicas: dict[str, int]
) -> dict[str, Any]:
    """A loop whose event path costs `path` us/event: 1 per service and Redis, the rest in
    storage's own Postgres backends."""
    cpu = dict.fromkeys(("gateway", "ingest", "processor", "storage", "redis"), 1.0)
    return {
        "stored_eps": stored_eps,
        "acked": 1000,
        "stored": 1000,
        "replicas": replicas,
        "cpu_us_per_event": cpu | {"machine": machine},
        "storage_backends_cpu_us_per_event": path - 5.0,
    }


def test_mesh_cost_is_replicated_over_single() -> None:
    one = dict.fromkeys(("gateway", "ingest", "processor", "storage", "auth"), 1)
    two = one | {"gateway": 2}
    replicated_loop = _loop(30_000, 60.0, 24.0, two) | {
        "cpu_us_per_replica": {"gateway@1": 2.5, "gateway@2": 2.0}
    }
    mesh: dict[str, Any] = {"duration_s": 10, "loops": {"single": _loop(40_000, 50.0, 20.0, one)}}
    assert mesh_costs(mesh["loops"])["stored_eps_ratio"] is None  # the second loop is missing
    mesh["loops"]["replicated"] = replicated_loop
    costs = mesh_costs(mesh["loops"])
    assert costs == {
        "stored_eps_ratio": pytest.approx(0.75),
        "machine_cpu_ratio": pytest.approx(1.2),
        "machine_cpu_added_us": pytest.approx(10.0),
        "path_cpu_ratio": pytest.approx(1.2),
        "path_cpu_added_us": pytest.approx(4.0),
    }
    text = "\n".join(render_mesh_cost(mesh | {"costs": costs}))
    assert "storage=1,auth=1,ingest=1,processor=1,gateway=2" in text
    assert "per replica (us/event): gateway @1 2.5, @2 2.0" in text
    assert (
        "stored rate 0.75x, CPU per event: whole machine 1.20x (+10.0 us), event path 1.20x (+4.0 us;"
        in text
    )
    assert mesh_cost_problems(mesh) == []
    replicated_loop["stored"] = 999
    assert mesh_cost_problems(mesh) == [
        "NOT STORED EXACTLY ONCE: mesh cost replicated: 1000 acknowledged, 999 stored"
    ]
    assert render_mesh_cost(None) == [] and mesh_cost_problems(None) == []


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_tiny_run_on_two_storage_replicas_then_two_gateways(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    run = uuid.uuid4().hex[:10]
    config = bench_test_config(tmp_path, database_url, redis_url, run)
    out = tmp_path / "bench.json"
    args = _parser().parse_args(
        [
            # 2,500 events: the open loop's read-back takes 3 pages over the 2 storage replicas.
            *("bench", "--rate", "2500", "--warmup", "0", "--duration", "1"),
            *("--closed-duration", "1", "--closed-batch-size", "200", "--raw-events", "1000"),
            *("--replicas", "storage=2", "--compare-replicas", "gateway=2"),
            *("--variants", "none", "--no-processing", "--json", str(out)),
        ]
    )

    assert await cmd_bench(config, args) == 0
    report = json.loads(out.read_text())

    assert report["parameters"]["replicas"]["storage"] == 2
    assert report["parameters"]["replicas"]["gateway"] == 1
    for phase in (*report["open_loops"], report["closed_loop"], report["raw"]):
        assert set(phase["cpu_us_per_replica"]) == {"storage@1", "storage@2"}
        assert all(_finite(v) for v in phase["cpu_us_per_replica"].values())
        assert _finite(phase["cpu_us_per_event"]["storage"])
    closed = report["closed_loop"]
    assert closed["acked"] > 0 and closed["acked"] == closed["stored"]
    # Both storage replicas' Postgres backends are found and counted.
    assert _finite(closed["storage_backends_cpu_us_per_event"])

    mesh = report["mesh_cost"]
    assert "error" not in mesh
    single, many = mesh["loops"]["single"], mesh["loops"]["replicated"]
    assert set(single["replicas"].values()) == {1} and "cpu_us_per_replica" not in single
    assert many["replicas"]["gateway"] == 2 and many["replicas"]["storage"] == 1
    assert set(many["cpu_us_per_replica"]) == {"gateway@1", "gateway@2"}
    for loop in (single, many):
        assert loop["acked"] > 0 and loop["acked"] == loop["stored"]
        assert _finite(loop["stored_eps"]) and _finite(loop["cpu_us_per_event"]["machine"])
    assert all(_finite(value) for value in mesh["costs"].values())

    # The teardown stopped every replica the runs started.
    pids = report["teardown"]["pids"]
    assert {"gateway", "gateway@2", "storage"} <= set(pids)
    assert not [pid for pid in pids.values() if pid and process_alive(pid)]
