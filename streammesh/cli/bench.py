"""`streammesh bench`: how fast the whole mesh is, on its own stack, against a bare baseline.

1. open loop, at each rate of --rate: batches sent on a fixed schedule over the gateway's Publish stream;
   publish-ack latency from each batch's INTENDED send time (no coordinated omission), and
   ack-to-stored latency from the client's ack time to the stored event's store_time;
2. closed loop: --streams Publish streams, each with --window batches in flight, as fast as acks
   come, then until storage caught up;
3. raw path: the same durable work done the best bare way we know (bench_raw: column-wise
   entries, a consumer per partition, grouped INSERTs into storage's own table), every command
   packed before its window, for the ratio mesh/raw;
and CPU microseconds per event for each service, Redis, PostgreSQL and the load generator.

The bench starts its own stack (state `<state>/bench`, free loopback ports, schemas `bench_*`,
streams `...:bench:events:*`), and stops it and drops its data at the end, on errors and on
Ctrl-C. Speed never sets the exit code (the machine is shared); losing an event does.

This module is the command and its order of phases; bench_setup the stack's lifecycle,
bench_phases the phases, bench_report the printing and the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from redis.exceptions import RedisError

from streammesh.cli import bench_load as load
from streammesh.cli.bench_mesh_cost import mesh_cost_problems, render_mesh_cost, run_mesh_cost
from streammesh.cli.bench_phases import (
    TEMPLATES,
    closed_phase,
    open_phase,
    raw_phase,
    warm_up,
)
from streammesh.cli.bench_processing import add_processing_arguments, processing_phases
from streammesh.cli.bench_processing_report import processing_problems, render_processing
from streammesh.cli.bench_replicas import replica_pids
from streammesh.cli.bench_report import TARGETS, correctness, finite, render, targets_met
from streammesh.cli.bench_resources import ResourceSampler, resource_summary
from streammesh.cli.bench_setup import (
    backlog_bound,
    bench_schemas,
    bench_stack_config,
    cancel_on_sigterm,
    drop_bench_data,
    exclusive,
    redis_baseline,
    stack_limits,
)
from streammesh.cli.bench_soak import (
    default_soak_warmup,
    render_soak,
    soak_phase,
    soak_problems,
    soak_rate,
)
from streammesh.cli.bench_variants import add_variant_arguments, run_variants, stack_session
from streammesh.cli.bench_variants_report import render_variants, variant_problems
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.stack import (
    START_ORDER,
    StackConfig,
    StartError,
    bring_up,
    process_alive,
    recorded_replicas,
    shut_down,
)
from streammesh.cli.stack_commands import replicas_type

__all__ = ["add_bench_command", "cmd_bench"]

RAW_MAX_EVENTS = 2_000_000
"""The raw path's default size cap: it packs every command before its window (~300 B/event)."""


async def _phases(bench: StackConfig, args: argparse.Namespace, run: str) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(stack_session(bench, args, run, run))
        machine = await load.machine_facts(bench.database_url, session.redis)
        sampler = await stack.enter_async_context(
            ResourceSampler(replica_pids(bench, START_ORDER), session.redis)
        )
        if args.warmup > 0:
            async with sampler.phase("warmup"):
                await warm_up(session)
        opened = []
        for n, rate in enumerate(args.rate):
            async with sampler.phase(f"open{n}"):
                opened.append(await open_phase(session, rate, n))
        async with sampler.phase("closed"):
            closed = await closed_phase(session)
        soak = None
        if args.soak:
            rate, basis = soak_rate(closed, args.soak_rate)
            warmup = (
                default_soak_warmup(args.soak) if args.soak_warmup is None else args.soak_warmup
            )
            async with sampler.phase("soak"):
                soak = await soak_phase(
                    session,
                    sampler,
                    rate=rate,
                    basis=basis,
                    seconds=args.soak,
                    warmup=warmup,
                    batch_size=args.soak_batch_size or args.closed_batch_size,
                )
        async with sampler.phase("raw"):
            raw = await raw_phase(session, args.raw_events or min(closed["acked"], RAW_MAX_EVENTS))
        processing = None
        if not args.no_processing:  # last: its definitions make the engine read every event
            async with sampler.phase("processing"):
                processing = await processing_phases(session, closed)
        machine["loadavg_at_end"] = list(os.getloadavg())
    phases = ["warmup", *(f"open{n}" for n in range(len(opened))), "closed", "soak", "raw",
              "processing"]  # fmt: skip
    resources = {
        name: resource_summary(sampler.of(name), interval=sampler.interval)
        for name in phases
        if sampler.of(name)
    }
    resources["run"] = resource_summary(sampler.samples, interval=sampler.interval)
    mesh_cpu = closed["cpu_us_per_event"]["machine"]
    raw_cpu = raw["cpu_us_per_event"]["machine"]
    return {
        "machine": machine,
        "user": f"bench-{run}",
        "open_loops": opened,
        "closed_loop": closed,
        "loadgen": {"stamp_us_per_event": closed.pop("stamp_us_per_event")},
        "raw": raw,
        "soak": soak,
        "processing": processing,
        "resources": resources,
        "mesh_over_raw": closed["stored_eps"] / raw["stored_eps"],
        # Whole-machine CPU per event, closed loop over raw path: what the mesh costs over it.
        "mesh_over_raw_cpu": None if not mesh_cpu or not raw_cpu else mesh_cpu / raw_cpu,
    }


async def cmd_bench(config: StackConfig, args: argparse.Namespace) -> int:
    bench = bench_stack_config(config)
    with exclusive(bench.state_dir / "bench.lock") as locked:
        if not locked:
            print(f"another bench is running on {bench.state_dir}", flush=True)
            return 1
        return await _bench(config, bench, args)


async def _bench(config: StackConfig, bench: StackConfig, args: argparse.Namespace) -> int:
    run = secrets.token_hex(4)
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] | None = None
    failure = ""
    async with cancel_on_sigterm():
        try:
            shut_down(bench)  # a previous bench killed hard may have left its services behind
            await drop_bench_data(bench)
            print(f"starting the bench stack in {bench.state_dir} (mTLS, auth on)", flush=True)
            await bring_up(bench, replicas=args.replicas, timeout=90, extra_env=stack_limits(args))
            replicas = recorded_replicas(bench)
            baseline = await redis_baseline(bench)
            results = await _phases(bench, args, run)
            results["variants"] = await run_variants(bench, args, run, results["raw"])
            results["mesh_cost"] = await run_mesh_cost(bench, args, run)
            results["redis_baseline_bytes"] = baseline
        except (StartError, load.BenchError, grpc.aio.AioRpcError, OSError, RedisError,
                asyncpg.PostgresError) as error:  # fmt: skip
            detail = describe_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else error
            failure = f"bench failed: {type(error).__name__}: {detail}"
        except asyncio.CancelledError:
            # Ctrl-C (asyncio.run cancels this task) or SIGTERM: tear down, then exit 130.
            if (task := asyncio.current_task()) is not None:
                task.uncancel()
            failure = "bench interrupted"
        finally:
            pids = replica_pids(bench, START_ORDER)
            stopped = shut_down(bench)
            try:
                await asyncio.wait_for(drop_bench_data(bench), timeout=30)
                dropped = "its schemas and streams dropped"
            except Exception as error:  # teardown must finish; say what was left behind
                dropped = f"could not drop its data ({error!r}); the next bench run will"
            how = ", ".join(f"{name} {outcome}" for name, outcome in stopped.items())
            print(f"bench stack down ({how}); {dropped}", flush=True)
    if results is None:
        print(failure or "bench failed", flush=True)
        return 130 if failure == "bench interrupted" else 1
    report: dict[str, Any] = {
        "run_id": run,
        "started_at": started.isoformat(),
        "parameters": {
            key: getattr(args, key)
            for key in (
                "rate",
                "duration",
                "batch_size",
                "warmup",
                "closed_duration",
                "streams",
                "window",
                "closed_batch_size",
                "payload_bytes",
                "keys",
                "raw_events",
                "soak",
                "soak_rate",
                "soak_batch_size",
                "soak_warmup",
            )
        }
        | {
            "partitions": bench.partitions,
            "replicas": replicas,
            "templates": TEMPLATES,
            "backpressure": backlog_bound(args, bench.partitions),
        },
        "targets": TARGETS,
        **results,
        "teardown": {
            "pids": pids,
            "alive_after": [pid for pid in pids.values() if pid and process_alive(pid)],
            "outcome": stopped,
            "schemas": bench_schemas(bench),
            "stream_prefix": bench.stream_prefix,
        },
    }
    report["targets_met"] = targets_met(report)
    path = args.json or config.state_dir / "bench" / f"results-{started:%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(report), indent=2) + "\n")
    print("\n".join(render(report)))
    if report["variants"] is not None:
        print("\n".join(render_variants(report["variants"], report["raw"])))
    if report["soak"] is not None:
        print("\n".join(render_soak(report["soak"], report["resources"]["soak"])))
    print("\n".join(render_processing(report["processing"])))
    print("\n".join(render_mesh_cost(report["mesh_cost"])))
    print(f"results: {path}")
    problems = [] if report["soak"] is None else soak_problems(report["soak"])
    problems += variant_problems(report["variants"])
    problems += processing_problems(report["processing"])
    problems += mesh_cost_problems(report["mesh_cost"])
    return correctness(report, problems)


def _positive(kind: type[int] | type[float], low: float, high: float) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def _rates(text: str) -> list[float]:
    """`--rate`: one or more offered rates, comma-separated, each 1..1e6 events/s."""
    parse = _positive(float, 1, 1e6)
    try:
        rates = [float(parse(part.strip())) for part in text.split(",")]
    except ValueError as error:  # float('x') or an ArgumentTypeError, said the same way
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    if len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"{text!r}: a rate is given twice")
    return rates


def add_bench_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = commands.add_parser(
        "bench",
        help="benchmark the mesh on its own stack (open loop, closed loop, raw baseline)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    bench.add_argument("--rate", type=_rates, default=[5000.0, 20000.0],
                       help="open loops: events/s offered, comma-separated, one open loop each "
                       "in this order (default 5000,20000)")  # fmt: skip
    bench.add_argument("--duration", type=_positive(float, 0.1, 3600), default=60.0,
                       help="open loop: seconds (default 60)")  # fmt: skip
    bench.add_argument("--batch-size", type=_positive(int, 1, 10_000), default=100,
                       help="open loop: events per batch (default 100)")  # fmt: skip
    bench.add_argument("--warmup", type=_positive(float, 0, 600), default=5.0,
                       help="unmeasured load at the first --rate before the open loops, seconds (default 5)")  # fmt: skip
    bench.add_argument("--closed-duration", type=_positive(float, 0.1, 3600), default=60.0,
                       help="closed loop: seconds (default 60: the sustained rate the target names)")  # fmt: skip
    bench.add_argument("--streams", type=_positive(int, 1, 64), default=4,
                       help="closed loop: concurrent Publish streams (default 4)")  # fmt: skip
    bench.add_argument("--window", type=_positive(int, 1, 256), default=4,
                       help="closed loop: batches in flight per stream (default 4)")  # fmt: skip
    bench.add_argument("--closed-batch-size", type=_positive(int, 1, 10_000), default=1000,
                       help="closed loop and raw path: events per batch (default 1000)")  # fmt: skip
    bench.add_argument("--payload-bytes", type=_positive(int, 48, 65_536), default=128,
                       help="JSON payload size of every event (default 128)")  # fmt: skip
    bench.add_argument("--keys", type=_positive(int, 1, 1_000_000), default=1024,
                       help="distinct partition keys (default 1024)")  # fmt: skip
    bench.add_argument("--raw-events", type=_positive(int, 0, 100_000_000), default=0,
                       help="raw path events (default 0: as many as the closed loop acknowledged, "
                       f"at most {RAW_MAX_EVENTS:,}; ~300 bytes of memory each)")  # fmt: skip
    bench.add_argument("--soak", type=_positive(float, 0, 86_400), default=0.0, metavar="SECONDS",
                       help="after the closed loop, hold 70%% of its stored rate as an open loop "
                       "for SECONDS and report RSS, fds, Redis memory and errors (default 0: no soak)")  # fmt: skip
    bench.add_argument("--soak-rate", type=_positive(float, 1, 1e6), default=None,
                       help="soak: events/s offered instead of 70%% of the closed loop's")  # fmt: skip
    bench.add_argument("--soak-batch-size", type=_positive(int, 1, 10_000), default=None,
                       help="soak: events per batch (default --closed-batch-size: the rate is "
                       "the closed loop's, so are its batches)")  # fmt: skip
    bench.add_argument("--soak-warmup", type=_positive(float, 0, 3600), default=None,
                       help="soak: seconds before RSS counts (default a tenth of --soak, at most 60)")  # fmt: skip
    bench.add_argument("--idempotency-window", type=_positive(int, 0, 86_400), default=60,
                       metavar="SECONDS", help="ingest's idempotency window (default 60, as "
                       "ingest's default; 0: off, to measure what it costs)")  # fmt: skip
    bench.add_argument("--idempotency-max-ids", type=_positive(int, 2, 100_000_000),
                       default=100_000, metavar="IDS", help="ids the window holds per partition "
                       "at most (default 100000, as ingest's default)")  # fmt: skip
    bench.add_argument("--json", type=Path, default=None,
                       help="results file (default <state>/bench/results-<timestamp>.json)")  # fmt: skip
    bench.add_argument("--replicas", type=replicas_type, default=None, metavar="SERVICE=N,...",
                       help="processes per service of the bench stack, as `streammesh up "
                       "--replicas` takes them (default one each), e.g. "
                       "gateway=2,ingest=2,processor=2,storage=2")  # fmt: skip
    bench.add_argument("--compare-replicas", type=replicas_type, default=None,
                       metavar="SERVICE=N,...", help="after the other phases, a closed loop "
                       "(--closed-duration) on the stack restarted with one process per "
                       "service, then on it restarted with these replicas: what the mesh's "
                       "replicas cost (default: not run)")  # fmt: skip
    add_variant_arguments(bench)
    add_processing_arguments(bench)
    bench.set_defaults(handler=cmd_bench)
