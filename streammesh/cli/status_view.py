"""`streammesh status`: every replica's process and health, with request rate, error ratio, p99,
partitions owned and lag measured from its /metrics over a short window (status_metrics).

streammesh status [--window S]      one table, figures over S seconds (default 1)
streammesh status --watch [S]       a new table every S seconds (default 2), until Ctrl-C
streammesh status --json            one JSON object per replica (JSON lines with --watch)
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tabulate import tabulate

from streammesh.cli.stack import ServiceState, StackConfig, stack_status
from streammesh.cli.status_metrics import Reading, ReplicaFigures, figures, read_metrics

__all__ = ["ReplicaStatus", "measure", "render", "run_status"]


@dataclass(frozen=True)
class ReplicaStatus:
    """One line of `status`: the process (from the stack's records) and its measured figures."""

    replica: str
    service: str
    pid: int | None
    health: str
    endpoint: str
    metrics_url: str | None
    requests_per_second: float | None
    error_ratio: float | None
    p99_ms: float | None
    partitions_owned: int | None
    lag: int | None
    window_seconds: float | None


def metrics_url(config: StackConfig, state: ServiceState) -> str | None:
    """The replica's /metrics address: replica k of a service on the base port + 100 x (k - 1)."""
    instance = state.name.split("@", 1)[1] if "@" in state.name else "1"
    port = config.metrics_port(state.service, int(instance) if instance.isdigit() else 1)
    return f"http://{config.host}:{port}/metrics" if port else None


async def _scrape(urls: Sequence[str | None]) -> list[Reading | None]:
    async def one(url: str | None) -> Reading | None:
        return await read_metrics(url) if url else None

    return list(await asyncio.gather(*(one(url) for url in urls)))


def _line(config: StackConfig, state: ServiceState, measured: ReplicaFigures) -> ReplicaStatus:
    p99 = measured.p99_seconds
    return ReplicaStatus(
        replica=state.name,
        service=state.service,
        pid=state.pid,
        health=state.health,
        endpoint=state.address,
        metrics_url=metrics_url(config, state),
        requests_per_second=measured.requests_per_second,
        error_ratio=measured.error_ratio,
        p99_ms=None if p99 is None else p99 * 1000,
        partitions_owned=measured.partitions_owned,
        lag=measured.lag,
        window_seconds=measured.window_seconds,
    )


class StatusSampler:
    """Keeps each replica's last scrape, so every round's figures cover the time since the
    previous round (the first round scrapes twice, `window` seconds apart)."""

    def __init__(self, config: StackConfig) -> None:
        self._config = config
        self._last: dict[str, Reading | None] = {}

    async def round(self, window: float) -> list[ReplicaStatus]:
        states = await stack_status(self._config)
        urls = [metrics_url(self._config, state) for state in states]
        if any(state.name not in self._last for state in states):
            for state, reading in zip(states, await _scrape(urls), strict=True):
                self._last.setdefault(state.name, reading)
            await asyncio.sleep(window)
        now = await _scrape(urls)
        lines = [
            _line(self._config, state, figures(self._last.get(state.name), reading))
            for state, reading in zip(states, now, strict=True)
        ]
        self._last = {state.name: reading for state, reading in zip(states, now, strict=True)}
        return lines


async def measure(config: StackConfig, window: float = 1.0) -> list[ReplicaStatus]:
    """One table's lines, figures over `window` seconds."""
    return await StatusSampler(config).round(window)


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(lines: Sequence[ReplicaStatus]) -> str:
    rows = [
        (
            line.replica,
            line.pid or "-",
            line.endpoint.rsplit(":", 1)[1],
            line.health,
            _number(line.requests_per_second),
            "-" if line.error_ratio is None else f"{line.error_ratio:.2%}",
            _number(line.p99_ms),
            "-" if line.partitions_owned is None else line.partitions_owned,
            "-" if line.lag is None else f"{line.lag:,}",
        )
        for line in lines
    ]
    headers = ("replica", "pid", "port", "health", "req/s", "errors", "p99(ms)", "parts", "lag")
    # "plain": no rule under the header, so that `awk`/`grep` see one line per replica.
    return tabulate(
        rows,
        headers=headers,
        tablefmt="plain",
        disable_numparse=True,
        colalign=("left",) * 4 + ("right",) * 5,
    )


def _print(config: StackConfig, lines: Sequence[ReplicaStatus], *, as_json: bool) -> None:
    if as_json:
        for line in lines:
            print(json.dumps(asdict(line)), flush=True)
        return
    print(render(lines))
    print(
        f"state folder: {config.state_dir}  (logs in {config.state_dir / 'logs'}); "
        "req/s, errors (server faults) and p99 (unary) from /metrics"
    )


async def run_status(
    config: StackConfig, *, window: float, watch: float | None, as_json: bool
) -> int:
    """Print the table once (exit 1 when a replica is not SERVING), or every `watch` seconds."""
    sampler = StatusSampler(config)
    lines = await sampler.round(window)
    if watch is None:
        _print(config, lines, as_json=as_json)
        return 0 if all(line.health == "SERVING" for line in lines) else 1
    while True:
        if not as_json and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # clear the terminal, as watch(1) does
        if not as_json:
            print(time.strftime("%Y-%m-%d %H:%M:%S"), f"(every {watch:g} s; Ctrl-C stops)")
        _print(config, lines, as_json=as_json)
        await asyncio.sleep(watch)
        lines = await sampler.round(watch)
