"""What the bench stack holds through every phase: each service's resident memory (RSS) and open
file descriptors, and Redis's `used_memory`, sampled by one background task every
SAMPLE_INTERVAL seconds, each sample labelled with the phase it fell in.

Processes are read from /proc (`statm` for RSS, the entries of `fd/` for descriptors): two reads
per process is all it takes, so psutil would be a dependency for nothing. Redis memory comes from
INFO memory, which works where CONFIG is disabled; it is the whole server's, so on a Redis shared
with other work it includes their keys (the bench's own Redis in the README's runs has none).
A spike shorter than the interval can fall between two samples: the max is the sampled max.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = [
    "SAMPLE_INTERVAL",
    "ResourceSample",
    "ResourceSampler",
    "mib",
    "open_fds",
    "redis_memory_line",
    "resource_summary",
    "rss_bytes",
]

SAMPLE_INTERVAL = 0.5
"""Seconds between samples: fine enough for a phase of a few seconds, and ~1 ms of the bench
process's CPU per sample (a few files per process and one INFO)."""
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (None when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def open_fds(pid: int) -> int | None:
    """Open file descriptors of a process (None when it is gone or not ours to read)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def _redis_used_memory(client: aioredis.Redis) -> int | None:
    try:
        return int((await client.info("memory"))["used_memory"])
    except (RedisError, KeyError, ValueError, OSError):  # refused or renamed: report it unknown
        return None


@dataclass(frozen=True, slots=True)
class ResourceSample:
    at: float
    """Event loop time of the sample (the clock the load phases use)."""
    phase: str
    rss: Mapping[str, int | None]
    """Bytes per service."""
    fds: Mapping[str, int | None]
    redis_used_memory: int | None


@dataclass
class ResourceSampler:
    """Samples `pids` and Redis in the background while entered; `phase(name)` labels what is
    sampled meanwhile and samples at its start and end, so even a short phase has two."""

    pids: Mapping[str, int | None]
    redis: aioredis.Redis
    interval: float = SAMPLE_INTERVAL
    samples: list[ResourceSample] = field(default_factory=list)
    _phase: str = ""
    _task: asyncio.Task[None] | None = None

    async def sample(self) -> ResourceSample:
        """One sample now, kept."""
        loop = asyncio.get_running_loop()
        redis_memory = await _redis_used_memory(self.redis)
        taken = ResourceSample(
            at=loop.time(),
            phase=self._phase,
            rss={name: rss_bytes(pid) if pid else None for name, pid in self.pids.items()},
            fds={name: open_fds(pid) if pid else None for name, pid in self.pids.items()},
            redis_used_memory=redis_memory,
        )
        self.samples.append(taken)
        return taken

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> ResourceSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        self._phase = name
        await self.sample()
        try:
            yield
        finally:
            await self.sample()
            self._phase = ""

    def of(self, phase: str) -> list[ResourceSample]:
        return [s for s in self.samples if s.phase == phase]


def _first_last_max(values: Sequence[int | None]) -> dict[str, int | None]:
    known = [v for v in values if v is not None]
    return {
        "first": values[0] if values else None,
        "last": values[-1] if values else None,
        "max": max(known) if known else None,
    }


def _growth_pct(first: int | None, last: int | None) -> float | None:
    return None if not first or last is None else (last - first) / first * 100


def _trend_pct_per_min(samples: Sequence[ResourceSample], name: str) -> float | None:
    """Least-squares slope of RSS over time, in % of the first value per minute: a steady leak
    shows here even when the last sample happens to fall after a garbage collection."""
    points = [(s.at, s.rss[name]) for s in samples if s.rss.get(name) is not None]
    if len(points) < 3 or points[-1][0] - points[0][0] <= 0:
        return None
    slope, _ = statistics.linear_regression(
        [t for t, _ in points], [float(r or 0) for _, r in points]
    )
    first = points[0][1]
    return None if not first else slope * 60 / first * 100


def resource_summary(samples: Sequence[ResourceSample], *, interval: float) -> dict[str, Any]:
    """Per service RSS and fds (first, last, max; RSS growth first to last and its trend), and
    Redis used_memory (first, last, max) over `samples`, in time order."""
    names = list(samples[0].rss) if samples else []
    services = {}
    for name in names:
        rss = _first_last_max([s.rss.get(name) for s in samples])
        services[name] = {
            "rss_bytes": rss,
            "rss_growth_pct": _growth_pct(rss["first"], rss["last"]),
            "rss_trend_pct_per_min": _trend_pct_per_min(samples, name),
            "fds": _first_last_max([s.fds.get(name) for s in samples]),
        }
    return {
        "samples": len(samples),
        "interval_s": interval,
        "seconds": samples[-1].at - samples[0].at if samples else 0.0,
        "services": services,
        "redis_used_memory_bytes": _first_last_max([s.redis_used_memory for s in samples]),
    }


def mib(value: int | float | None) -> str:
    """Bytes as MiB with one decimal, '-' when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / 2**20:,.1f}"


def redis_memory_line(
    phase: str,
    resources: Mapping[str, Any],
    bound_above_start: int | None = None,
    *,
    baseline: int | None = None,
) -> str:
    """The one line that states Redis memory against its bound for a phase: the measured max,
    and, when the stack runs with back-pressure, the bound it gives (what the limits let the
    queue and the idempotency window hold, above `baseline`: Redis's memory before the bench
    wrote anything, or else the phase's starting memory)."""
    used = resources["redis_used_memory_bytes"]
    base = used["first"] if baseline is None else baseline
    bound = (
        ""
        if bound_above_start is None
        else f" against a bound of {mib(base + bound_above_start)} MiB"
        + ("" if baseline is None else f" (baseline {mib(baseline)})")
    )
    return (
        f"  Redis used_memory during the {phase}: max {mib(used['max'])} MiB{bound} (start "
        f"{mib(used['first'])}, end {mib(used['last'])}; {resources['samples']} samples every "
        f"{resources['interval_s']:g}s, the whole server's memory)"
    )
