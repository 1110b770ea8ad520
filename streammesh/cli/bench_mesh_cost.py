"""`streammesh bench --compare-replicas SPEC`: what the mesh costs when every hop has replicas
(issue 11), in the same run as the base figures.

After the base phases and the variants, the whole stack (auth too: its callers are given its
replicas' addresses) is restarted with one process of each service, warmed up for --warmup
seconds, and runs a closed loop of --closed-duration; then restarted with the replicas of SPEC
and does the same. A restarted stack is compared with a restarted stack (fresh processes,
pools and Postgres backends, warmed up alike), as the variants are. Printed: the stored rate and
whole-machine CPU per event of each, their ratios, each service's CPU (its replicas summed) and
each replica's. On 2 cores more processes do not add cores: what this shows is the cost of the
extra hops' connections, balancing and processes, not a scale-out.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from typing import Any

import asyncpg
import grpc
from redis.exceptions import RedisError

from streammesh.cli import bench_load as load
from streammesh.cli.bench_phases import MEASURED, closed_phase, warm_up
from streammesh.cli.bench_report import num
from streammesh.cli.bench_variants import restart_stack, stack_session
from streammesh.cli.bench_variants_report import loop_cpu
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.replicas import format_counts
from streammesh.cli.stack import START_ORDER, StackConfig, StartError, recorded_replicas

__all__ = ["mesh_cost_problems", "mesh_costs", "render_mesh_cost", "run_mesh_cost"]

LOOPS = ("single", "replicated")


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or not bottom else top / bottom


def mesh_costs(loops: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Replicated over single: the stored rate, and the CPU per event of the whole machine and
    of the event path's own processes (bench_variants_report.PATH; other work on a shared
    machine left out), with what the replicas add to each (None when a loop is missing)."""
    single, many = loops.get("single"), loops.get("replicated")
    costs: dict[str, float | None] = {
        "stored_eps_ratio": None
        if single is None or many is None
        else _ratio(many["stored_eps"], single["stored_eps"])
    }
    for row in ("machine", "path"):
        one, more = loop_cpu(single, row), loop_cpu(many, row)
        costs[f"{row}_cpu_ratio"] = _ratio(more, one)
        costs[f"{row}_cpu_added_us"] = None if one is None or more is None else more - one
    return costs


async def run_mesh_cost(
    bench: StackConfig, args: argparse.Namespace, run: str
) -> dict[str, Any] | None:
    """The two loops of --compare-replicas (None when not asked for), on the running stack's
    data; the stack is left running with SPEC's replicas (the bench's teardown stops it)."""
    if args.compare_replicas is None:
        return None
    plan = (
        ("single", "x1", dict.fromkeys(START_ORDER, 1)),
        ("replicated", "xn", args.compare_replicas),
    )
    out: dict[str, Any] = {"duration_s": args.closed_duration, "loops": {}}
    try:
        for key, tag, counts in plan:
            print(f"restarting the bench stack with {format_counts(counts)}", flush=True)
            started = time.perf_counter()
            await restart_stack(bench, args, {}, names=START_ORDER, replicas=counts)
            restarted = time.perf_counter() - started
            print(f"  restarted in {restarted:.1f}s", flush=True)
            async with stack_session(bench, args, run, f"{run}-{tag}") as s:
                if args.warmup > 0:
                    await warm_up(s, tag=f"w{tag}")
                loop = await closed_phase(s, f"mesh{key}", tag, duration=args.closed_duration)
            out["loops"][key] = loop | {
                "replicas": recorded_replicas(bench),
                "restart_s": restarted,
            }
    except (StartError, load.BenchError, grpc.aio.AioRpcError, OSError, RedisError,
            asyncpg.PostgresError) as error:  # fmt: skip
        # The base figures still stand: report what was measured and why it stopped.
        detail = describe_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else error
        out["error"] = f"{type(error).__name__}: {detail}"
    out["costs"] = mesh_costs(out["loops"])
    return out


def _replica_cells(loop: Mapping[str, Any]) -> str:
    by_replica = loop.get("cpu_us_per_replica") or {}
    groups: dict[str, list[str]] = {}
    for name, value in by_replica.items():
        service, _, number = name.partition("@")
        groups.setdefault(service, []).append(f"@{number} {num(value, '.1f')}")
    return "; ".join(f"{service} {', '.join(cells)}" for service, cells in groups.items())


def render_mesh_cost(mesh: Mapping[str, Any] | None) -> list[str]:
    """The comparison's lines (none when it did not run)."""
    if mesh is None:
        return []
    loops, costs = mesh["loops"], mesh["costs"]
    lines = [
        "",
        f"mesh cost: closed loop of {mesh['duration_s']:g}s on a restarted, warmed-up stack "
        "with one process per service, then with the replicas below",
        f"  {'replicas':<50}{'stored/s':>9}{'machine':>9}{'path':>7}"
        + "".join(f"{name:>10}" for name in (*MEASURED, "redis", "pg own"))
        + "  (CPU us/event)",
    ]
    for key in LOOPS:
        if key not in loops:
            continue
        loop = loops[key]
        lines.append(
            f"  {format_counts(loop['replicas']):<50}{num(loop['stored_eps']):>9}"
            f"{num(loop_cpu(loop, 'machine'), '.1f'):>9}{num(loop_cpu(loop, 'path'), '.1f'):>7}"
            + "".join(
                f"{num(loop_cpu(loop, name), '.1f'):>10}" for name in (*MEASURED, "redis", "pg_own")
            )
        )
        if cells := _replica_cells(loop):
            lines.append(f"    per replica (us/event): {cells}")
    lines.append(
        f"  replicated/single: stored rate {num(costs['stored_eps_ratio'], '.2f', 'x')}, "
        f"CPU per event: whole machine {num(costs['machine_cpu_ratio'], '.2f', 'x')} "
        f"({num(costs['machine_cpu_added_us'], '+.1f')} us), event path "
        f"{num(costs['path_cpu_ratio'], '.2f', 'x')} ({num(costs['path_cpu_added_us'], '+.1f')} "
        "us; its processes, Redis and storage's own Postgres backends: other work on the "
        "machine left out)"
    )
    if "error" in mesh:
        lines.append(f"  stopped early: {mesh['error']}")
    return lines


def mesh_cost_problems(mesh: Mapping[str, Any] | None) -> list[str]:
    """A loop of the comparison that did not store every acknowledged event exactly once."""
    if mesh is None:
        return []
    return [
        f"NOT STORED EXACTLY ONCE: mesh cost {key}: {loop['acked']} acknowledged, "
        f"{loop['stored']} stored"
        for key, loop in mesh["loops"].items()
        if loop["acked"] != loop["stored"]
    ]
