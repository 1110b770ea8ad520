"""`streammesh bench --variants`: what validation, tracing and metrics cost the mesh, and what
issue 9's table costs an insert, measured in the same run as the base figures (issues 9, 12).

After the base phases, on the stack as it is (metrics on, tracing off):
- `legacy`: the raw path again, right after the base one, into the pre-issue-9 table
  (bench_legacy): Postgres backend CPU per event and rows/s before and after tenants, day
  partitions and `event_ids`;
- a reference closed loop with the base settings and payloads, --variant-duration long, which
  the validation loops are compared with (same length, so the same catch-up tail);
- `validation`: a closed loop of ~100-byte JSON order payloads whose type has no schema
  (validation off), then the same payloads under a type a schema-admin user registered a
  5-property Draft 2020-12 schema for through the gateway (validation on): the difference in
  ingest's CPU per event is what validating costs;
then each of these with the event path's services (gateway, ingest, processor, storage)
restarted (bench_setup's lifecycle, the run's data kept) and warmed up again for --warmup
seconds, first with the base settings (the reference of the others), then with:
- `metrics`: metrics off (`STREAMMESH_<SERVICE>_METRICS_ENABLED=false`: no gRPC metrics layer,
  no /metrics listener);
- `tracing`: each of them traced with the `file` exporter (JSON lines under the bench's state
  folder, deleted afterwards) at 1%, then at 100% sampling.
The stack is left running with the last settings; the bench's teardown stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streammesh.api.common.v1 import event_pb2
from streammesh.api.gateway.v1 import schema_registry_pb2
from streammesh.cli import bench_load as load
from streammesh.cli.bench_legacy import legacy_table
from streammesh.cli.bench_phases import MEASURED, Session, closed_phase, raw_phase, warm_up
from streammesh.cli.bench_replicas import gateway_target, replica_pids
from streammesh.cli.bench_setup import keep_fresh, login, stack_limits
from streammesh.cli.bench_variants_report import variant_costs
from streammesh.cli.errors import describe_rpc_error
from streammesh.cli.stack import (
    StackConfig,
    StartError,
    bring_up,
    shut_down,
)
from streammesh.client import GatewayClient, gateway_config
from streammesh.mesh.client import MeshClient

__all__ = [
    "ORDER_SCHEMA",
    "VARIANTS",
    "add_variant_arguments",
    "order_payload",
    "restart_stack",
    "run_variants",
    "stack_session",
]

VARIANTS = ("validation", "tracing", "metrics", "legacy")
ORDER_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "minLength": 1, "maxLength": 64},
        "amount": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "quantity": {"type": "integer", "minimum": 1},
        "express": {"type": "boolean"},
    },
    "required": ["order_id", "amount", "currency", "quantity"],
    "additionalProperties": False,
}
"""The schema scripts/bench_payload_validation.py chose ingest's validator with (issue 9)."""
ORDER_PAYLOAD_BYTES = 100
SCHEMA_ADMIN_ROLES = ("schema-admin",)
TRACE_RATIOS = (0.01, 1.0)
RESTARTED = MEASURED
"""The services a variant restarts with its settings: the event path (gateway, ingest,
processor, storage); auth keeps running."""
SPAN_FLUSH_WAIT = 10.0
"""Seconds to wait for a traced stack's first spans (the SDK's batch exporter waits 5 s)."""


def order_payload(n: int) -> bytes:
    """Order n as JSON matching ORDER_SCHEMA, ORDER_PAYLOAD_BYTES long (the id padded)."""
    rest = (
        f'","amount":{n % 100_000 / 100:.2f},"currency":"{("EUR", "USD", "GBP")[n % 3]}",'
        f'"quantity":{1 + n % 9},"express":{"true" if n % 2 else "false"}}}'
    )
    head = '{"order_id":"order-'
    digits = max(len(str(n)), ORDER_PAYLOAD_BYTES - len(head) - len(rest))
    return f"{head}{n:0{digits}d}{rest}".encode()


def _order_batches(s: Session, phase: str, tag: str) -> list[list[event_pb2.Event]]:
    """The phase's batches (as Session.events makes them) with order payloads instead."""
    batches = s.events(phase, tag, s.args.closed_batch_size)
    for t, events in enumerate(batches):
        for index, event in enumerate(events):
            event.payload = order_payload(t * len(events) + index)
    return batches


@contextlib.asynccontextmanager
async def stack_session(
    bench: StackConfig, args: argparse.Namespace, run: str, user: str
) -> AsyncIterator[Session]:
    """A logged-in session on the running stack (every replica's current pid, the load on
    every gateway replica), user `bench-<user>`."""
    async with contextlib.AsyncExitStack() as stack:
        target = gateway_target(bench)
        client = await stack.enter_async_context(GatewayClient(target, bench.pki_dir / "ca.pem"))
        redis = aioredis.Redis.from_url(bench.redis_url)
        stack.push_async_callback(redis.aclose)
        load_client = MeshClient(gateway_config(target, bench.pki_dir / "ca.pem"))
        stack.push_async_callback(load_client.close)
        await login(client, bench, user)
        await stack.enter_async_context(keep_fresh(client))
        yield Session(
            bench=bench, args=args, run=run, client=client, redis=redis,
            publish=load.publish_call(load_client.channel), metadata=client.bearer,
            pids=replica_pids(bench, MEASURED),
        )  # fmt: skip


async def _register_schema(bench: StackConfig, user: str, event_type: str) -> int:
    """ORDER_SCHEMA registered for `event_type` by a schema-admin user through the gateway, as
    `streammesh schema register` does; its version."""
    async with GatewayClient(bench.address("gateway"), bench.pki_dir / "ca.pem") as client:
        await login(client, bench, user, roles=SCHEMA_ADMIN_ROLES)
        reply = await client.schemas.RegisterSchema(
            schema_registry_pb2.RegisterSchemaRequest(
                event_type=event_type, schema_json=json.dumps(ORDER_SCHEMA)
            ),
            metadata=client.bearer(),
            timeout=30,
        )
    return int(reply.schema.version)


def _every_service(settings: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """`settings` (names without the STREAMMESH_<SERVICE>_ prefix) for every restarted service."""
    return {
        name: {f"STREAMMESH_{name.upper()}_{key}": value for key, value in settings.items()}
        for name in RESTARTED
    }


def _tracing_env(spans: Path, ratio: float) -> dict[str, dict[str, str]]:
    """The file exporter at `ratio`, a file per service in `spans` (made here)."""
    spans.mkdir(parents=True, exist_ok=True)
    env = _every_service({"TRACING_EXPORTER": "file", "TRACING_SAMPLE_RATIO": f"{ratio:g}"})
    for name, variables in env.items():
        variables[f"STREAMMESH_{name.upper()}_TRACING_FILE"] = str(
            spans / f"{name}-{ratio:g}.jsonl"
        )
    return env


async def restart_stack(
    bench: StackConfig,
    args: argparse.Namespace,
    env: Mapping[str, Mapping[str, str]],
    *,
    names: Sequence[str] = RESTARTED,
    replicas: Mapping[str, int] | None = None,
) -> None:
    """The services `names` (default RESTARTED) stopped and brought up again with `env` over
    the bench's limits, `replicas` processes each (default --replicas, else one each; data
    kept; auth, off the event path, keeps running unless named). They stop side by side, not
    edge first as `streammesh down` stops them: the queue is drained and no client is
    connected (each loop's session is closed), so no service has work another one would still
    need, and four stops of about 2 s each take the time of one."""
    await asyncio.gather(*(asyncio.to_thread(shut_down, bench, names=[n]) for n in names))
    limits = stack_limits(args)
    merged = {name: {**limits.get(name, {}), **env.get(name, {})} for name in names}
    counts = args.replicas if replicas is None else replicas
    await bring_up(bench, replicas=counts, timeout=90, extra_env=merged)


def _checked(loop: dict[str, Any]) -> dict[str, Any]:
    """The loop's figures, plus what ingest refused one by one (a schema violation would)."""
    loop["refused_events"] = loop["acked_batches"] * loop["batch_size"] - loop["acked"]
    return loop


async def _spans(spans: Path, ratio: float) -> dict[str, int]:
    """Spans written so far per service. The exporter writes in batches every few seconds: at
    100% sampling, wait (bounded) until the first batch is out, so that a short run shows its
    spans too."""

    def counts() -> dict[str, int]:
        files = {name: spans / f"{name}-{ratio:g}.jsonl" for name in RESTARTED}
        return {
            name: len(path.read_bytes().splitlines()) if path.exists() else 0
            for name, path in files.items()
        }

    deadline = asyncio.get_running_loop().time() + SPAN_FLUSH_WAIT
    while ratio == 1.0 and not any(counts().values()):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    return counts()


def _restart_plan(
    chosen: set[str], spans: Path
) -> list[tuple[str, str, dict[str, dict[str, str]], float | None]]:
    """(loop name, id tag, environment, trace ratio) of each restarted loop, in order."""
    plan: list[tuple[str, str, dict[str, dict[str, str]], float | None]] = []
    if chosen & {"metrics", "tracing"}:
        # A restarted stack is compared with a restarted stack: fresh processes, pools and
        # Postgres backends, warmed up alike.
        plan.append(("base_restarted", "vr", {}, None))
    if "metrics" in chosen:
        plan.append(("metrics_off", "vm", _every_service({"METRICS_ENABLED": "false"}), None))
    if "tracing" in chosen:
        for share in TRACE_RATIOS:
            percent = f"{share * 100:g}"
            plan.append(
                (f"tracing_{percent}pct", f"vt{percent}", _tracing_env(spans, share), share)
            )
    return plan


async def _on_the_base_stack(
    bench: StackConfig, args: argparse.Namespace, run: str, events: int, out: dict[str, Any]
) -> None:
    """The legacy raw path (`events` of them), the reference loop and the validation loops,
    on the stack as the base phases left it."""
    chosen, loops, seconds = set(args.variants), out["loops"], args.variant_duration
    async with stack_session(bench, args, run, f"{run}-variants") as s:
        if "legacy" in chosen:
            legacy = await raw_phase(s, events, legacy_table(), phase="legacy", tag="l")
            legacy["method"] = "the raw path's, into the pre-issue-9 table (bench_legacy)"
            out["legacy"] = legacy
        if chosen - {"legacy"}:
            loops["base"] = await closed_phase(s, "vbase", "vb", duration=seconds)
        if "validation" in chosen:
            loops["json"] = _checked(await closed_phase(
                s, "vjson", "vj", _order_batches(s, "vjson", "vj"), seconds
            ))  # fmt: skip
            validated = f"bench.{run}.vvalid"
            out["schema_version"] = await _register_schema(bench, f"{run}-schemas", validated)
            loops["validation"] = _checked(await closed_phase(
                s, "vvalid", "vv", _order_batches(s, "vvalid", "vv"), seconds
            ))  # fmt: skip


async def _restarted(
    bench: StackConfig, args: argparse.Namespace, run: str, spans: Path, out: dict[str, Any]
) -> None:
    """Each loop of `_restart_plan` on the event path restarted with its settings."""
    for key, tag, env, ratio in _restart_plan(set(args.variants), spans):
        print(f"restarting the bench stack for {key.replace('_', ' ')}", flush=True)
        started = time.perf_counter()
        await restart_stack(bench, args, env)
        restarted = time.perf_counter() - started
        print(f"  restarted in {restarted:.1f}s", flush=True)
        async with stack_session(bench, args, run, f"{run}-{tag}") as s:
            if args.warmup > 0:
                await warm_up(s, tag=f"w{tag}")
            loop = await closed_phase(s, key.replace("_", ""), tag, duration=args.variant_duration)
        loop["restart_s"] = restarted
        if ratio is not None:
            loop["spans_written"] = await _spans(spans, ratio)
        out["loops"][key] = loop


async def run_variants(
    bench: StackConfig, args: argparse.Namespace, run: str, raw: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The variants of --variants (None when none), after the base phases, on the running
    stack; `raw` is the base raw path's section (its event count is the legacy run's)."""
    if not args.variants:
        return None
    out: dict[str, Any] = {
        "duration_s": args.variant_duration,
        "variants": sorted(args.variants),
        "loops": {},
    }
    spans = bench.state_dir / "spans"
    shutil.rmtree(spans, ignore_errors=True)
    try:
        await _on_the_base_stack(bench, args, run, raw["events"], out)
        await _restarted(bench, args, run, spans, out)
    except (StartError, load.BenchError, grpc.aio.AioRpcError, OSError, RedisError,
            asyncpg.PostgresError) as error:  # fmt: skip
        # The base figures still stand: report what the variants measured and why they stopped.
        detail = describe_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else error
        out["error"] = f"{type(error).__name__}: {detail}"
    finally:
        shutil.rmtree(spans, ignore_errors=True)  # open files of a running service stay valid
    out["costs"] = variant_costs(out, raw)
    return out


def _variant_list(text: str) -> list[str]:
    """`--variants`: `all`, `none`, or names of VARIANTS, comma-separated."""
    if text.strip() == "all":
        return list(VARIANTS)
    if text.strip() == "none":
        return []
    names = [part.strip() for part in text.split(",")]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown)}: not a variant (choose from {', '.join(VARIANTS)}, all, none)"
        )
    return names


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.1 and 3600")
    return value


def add_variant_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--variants", type=_variant_list, default=list(VARIANTS),
                       help="after the base phases, closed loops with validation on, metrics "
                       "off, tracing at 1%% and 100%%, and the raw path into the pre-issue-9 "
                       f"table: {','.join(VARIANTS)} (default all), or none")  # fmt: skip
    bench.add_argument("--variant-duration", type=_seconds, default=30.0, metavar="SECONDS",
                       help="each variant's closed loop and its reference loop (default 30)")  # fmt: skip
