"""The Postgres backends serving one local process, and their CPU: what the database spends on
that process's statements alone.

The bench's `postgres` row counts every process of the server, other tenants' too, so on a
shared server it charges their work to whichever phase runs longest per event. The raw path
measures its own backends (it knows their pids); this finds the backends of a process the bench
did not open the connections of (storage's pool), by matching the client ports of
pg_stat_activity against the process's TCP sockets in /proc. Linux only; None elsewhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from streammesh.cli.bench_load import connect_postgres, proc_cpu_seconds

__all__ = ["backend_cpu_between", "backend_pids_of", "backends_cpu"]


def _local_ports(pid: int) -> set[int]:
    """Local TCP ports of the process's sockets."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def backend_pids_of(database_url: str, pid: int | None) -> list[int] | None:
    """Pids of the server's backends whose client is a socket of local process `pid` (None
    when there is no such process or /proc does not tell)."""
    if pid is None:
        return None
    ports = _local_ports(pid)
    if not ports:
        return None
    conn = await connect_postgres(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY($1::int[])"
            " AND client_addr IS NOT NULL",
            sorted(ports),
        )
    finally:
        await conn.close()
    return [int(row["pid"]) for row in rows] or None


def backends_cpu(pids: Sequence[int] | None) -> dict[int, float] | None:
    """CPU seconds so far of each backend (None when none is known or one is gone)."""
    if not pids:
        return None
    seconds = {pid: proc_cpu_seconds(pid) for pid in pids}
    if None in seconds.values():
        return None
    return {pid: value for pid, value in seconds.items() if value is not None}


def backend_cpu_between(
    before: dict[int, float] | None, after: dict[int, float] | None
) -> float | None:
    """CPU seconds the backends spent between two readings of `backends_cpu`, each taken with
    the backends found at that moment: a pool connects on demand, so backends opened in
    between count whole (their CPU is all from the interval). None when a backend of the first
    reading is gone by the second (its last CPU is lost) or either reading failed."""
    if before is None or after is None or not before.keys() <= after.keys():
        return None
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())
